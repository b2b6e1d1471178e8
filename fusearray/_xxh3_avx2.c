/* XXH3-128 and XXH3-64 with AVX2 (see _xxh3_impl.h); only called where the CPU has it. */
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2")
#define FA_XXH3_NAME fa_xxh3_128_avx2
#define FA_XXH3_64_NAME fa_xxh3_64_avx2
#define FA_XXH3_PIECES_NAME fa_xxh3_128_pieces_avx2
#include "_xxh3_impl.h"
#endif
