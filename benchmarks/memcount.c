/* Live heap bytes for the benchmarks' peak-memory table (benchmarks/run.py), loaded with LD_PRELOAD:
 * every malloc-family call is passed to glibc and its usable size added to / taken from a running
 * total, whose high-water mark memcount_peak() reports (memcount_reset() restarts it from the
 * current total). Unlike the peak RSS, this does not depend on which pages the allocator happens to
 * reuse or return, so one process gives the same figure as the next. Benchmark tooling only. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static _Atomic long current_bytes = 0, peak_bytes = 0;

static void account(long delta) {
  long now = atomic_fetch_add(&current_bytes, delta) + delta;
  long peak = atomic_load(&peak_bytes);
  while (now > peak && !atomic_compare_exchange_weak(&peak_bytes, &peak, now)) {
  }
}

static void *track(void *p) {
  if (p) account((long)malloc_usable_size(p));
  return p;
}

void *malloc(size_t n) { return track(__libc_malloc(n)); }
void *calloc(size_t n, size_t size) { return track(__libc_calloc(n, size)); }
void *memalign(size_t align, size_t n) { return track(__libc_memalign(align, n)); }
void *aligned_alloc(size_t align, size_t n) { return track(__libc_memalign(align, n)); }
void *valloc(size_t n) { return track(__libc_memalign(4096, n)); }

int posix_memalign(void **out, size_t align, size_t n) {
  void *p = __libc_memalign(align, n);
  if (!p) return ENOMEM;
  *out = track(p);
  return 0;
}

void free(void *p) {
  if (!p) return;
  account(-(long)malloc_usable_size(p));
  __libc_free(p);
}

void *realloc(void *old, size_t n) {
  long before = old ? (long)malloc_usable_size(old) : 0;
  void *p = __libc_realloc(old, n);
  if (p) account((long)malloc_usable_size(p) - before);
  else if (old && n == 0) account(-before);
  return p;
}

long memcount_current(void) { return atomic_load(&current_bytes); }
long memcount_peak(void) { return atomic_load(&peak_bytes); }
void memcount_reset(void) { atomic_store(&peak_bytes, atomic_load(&current_bytes)); }
