/*
 * The XXH3 entry points (128-bit keyed ids, 64-bit stream record
 * hashes), compiled from the xxhash.h header of
 * libxxhash-dev (XXH_INLINE_ALL: everything static, nothing exported) for
 * the instruction set the including file selects. Two files include it:
 * _xxh3_generic.c (the compiler's baseline, SSE2 on x86-64) and
 * _xxh3_avx2.c (#pragma GCC target("avx2")); the shim picks one at load.
 *
 * Why not link libxxhash.so: Debian's build runs at ~19 GB/s here against
 * ~44 GB/s for AVX2, and a shared libxxhash loaded RTLD_GLOBAL (as the shim
 * must be) also captures python-xxhash's own XXH3 symbols, slowing it down.
 */
#define XXH_INLINE_ALL
#include <string.h>
#include <xxhash.h>

/* out: the 16-byte canonical (big-endian) digest, as python-xxhash's
 * xxh3_128_digest(data, seed) gives */
void FA_XXH3_NAME(const void *data, size_t len, unsigned long long seed, unsigned char *out)
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_withSeed(data, len, (XXH64_hash_t)seed));
    memcpy(out, c.digest, sizeof(c.digest));
}

/* out: the XXH3-128 id of the n pieces ptrs[i] (lens[i] bytes each) taken
 * in order as one block (the streaming state: a RAID-5 block lies in
 * pieces on several disks); the same digest as FA_XXH3_NAME of their join */
void FA_XXH3_PIECES_NAME(const void *const *ptrs, const size_t *lens, size_t n,
                         unsigned long long seed, unsigned char *out)
{
    XXH3_state_t st;
    XXH128_canonical_t c;
    XXH3_INITSTATE(&st);
    XXH3_128bits_reset_withSeed(&st, (XXH64_hash_t)seed);
    for (size_t i = 0; i < n; i++)
        XXH3_128bits_update(&st, ptrs[i], lens[i]);
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&st));
    memcpy(out, c.digest, sizeof(c.digest));
}

/* out: the 8-byte canonical (big-endian) digest, as python-xxhash's
 * xxh3_64_digest(data) gives (unseeded: the stream's record hash) */
void FA_XXH3_64_NAME(const void *data, size_t len, unsigned char *out)
{
    XXH64_canonical_t c;
    XXH64_canonicalFromHash(&c, XXH3_64bits(data, len));
    memcpy(out, c.digest, sizeof(c.digest));
}
