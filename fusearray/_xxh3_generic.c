/* XXH3-128 for the baseline instruction set (see _xxh3_impl.h). */
#define FA_XXH3_NAME fa_xxh3_128_generic
#include "_xxh3_impl.h"
