/* XXH3-128 and XXH3-64 for the baseline instruction set (see _xxh3_impl.h). */
#define FA_XXH3_NAME fa_xxh3_128_generic
#define FA_XXH3_64_NAME fa_xxh3_64_generic
#define FA_XXH3_PIECES_NAME fa_xxh3_128_pieces_generic
#include "_xxh3_impl.h"
