/* SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104), small and dependency-free. */
#ifndef SMOLVM_SHA256_H
#define SMOLVM_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
  uint32_t h[8];
  uint64_t len;
  uint8_t buf[64];
  size_t fill;
} sha256_ctx;

void sha256_init(sha256_ctx *c);
void sha256_update(sha256_ctx *c, const void *data, size_t n);
void sha256_final(sha256_ctx *c, uint8_t out[32]);

typedef struct {
  sha256_ctx inner, outer;
} hmac_sha256_ctx;

void hmac_sha256_init(hmac_sha256_ctx *c, const uint8_t *key, size_t keylen);
void hmac_sha256_update(hmac_sha256_ctx *c, const void *data, size_t n);
void hmac_sha256_final(hmac_sha256_ctx *c, uint8_t out[32]);

#endif
