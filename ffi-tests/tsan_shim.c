/*
 * Linked into the C tests only in ThreadSanitizer mode (SB_TSAN=1, see `make tsan`).
 *
 * rustc's LLVM instruments the library's memory copies as calls to __tsan_memcpy,
 * __tsan_memmove and __tsan_memset; the ThreadSanitizer runtime that ships with gcc 12
 * (which the C tests link) predates those entry points. Forwarding them to the libc
 * functions keeps the checks: the runtime intercepts memcpy, memmove and memset.
 * The test executable exports them (-rdynamic) so that libswitchboard.so binds to them.
 * They are weak: a runtime that has them (clang's) keeps its own.
 */
#include <string.h>

void *__tsan_memcpy(void *dst, const void *src, size_t n);
void *__tsan_memmove(void *dst, const void *src, size_t n);
void *__tsan_memset(void *dst, int c, size_t n);

__attribute__((weak)) void *__tsan_memcpy(void *dst, const void *src, size_t n)
{
    return memcpy(dst, src, n);
}

__attribute__((weak)) void *__tsan_memmove(void *dst, const void *src, size_t n)
{
    return memmove(dst, src, n);
}

__attribute__((weak)) void *__tsan_memset(void *dst, int c, size_t n)
{
    return memset(dst, c, n);
}
