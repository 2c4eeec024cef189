/* The shared-memory all-to-all's loop (expertpool.model.shm_exchange) in one C call.

   The protocol is the Python loop's, byte for byte: per ordered pair (src, dst) a header of two int64
   counters, `sent` (pieces written, only src stores it) and `taken` (pieces consumed, only dst stores
   it), and a ring of two slots; piece k of a pair goes in slot k & 1. A payload is copied before the
   counter that publishes it is stored (release), and read after the counter is loaded (acquire).

   What C adds is the wait. Python polled and slept 20 us between polls (~95 us in practice), so a rank
   learnt of its peer's rows up to ~100 us late, and a call whose peer was already there took 24-32 us
   against 16-22 here (bench/ep_exchange.py).
   Here a waiting rank spins for `spin_ns`, then sleeps on a futex: its doorbell, a 32-bit counter in
   its own 64-byte rank record (offset 16; offset 20: "asleep"). A rank that publishes a piece for d, or
   frees one of d's slots, increments d's doorbell and, if d is asleep, wakes it. The sleeper reads its
   doorbell before it looks at the counters, so a piece published after the look has also rung the
   bell and FUTEX_WAIT returns at once; the "asleep" flag is set and the bell re-read with full
   barriers on both sides, so a waker either sees the flag or the sleeper sees the new bell value.

   The call returns 1 after `slice_ns` without finishing, with its progress in tx/rx, so the caller can
   check that its peers are alive, the abort flag and the timeout, and call again. 0: done. */

#define _GNU_SOURCE
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define REC 64     /* bytes per rank record and per pair header */
#define BELL 16    /* the doorbell's offset in a rank record; the "asleep" flag follows it */

static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline int32_t *bell_of(char *base, int rank) { return (int32_t *)(base + (int64_t)rank * REC + BELL); }

static void ring(char *base, int rank) {
    int32_t *bell = bell_of(base, rank);
    __atomic_fetch_add(bell, 1, __ATOMIC_SEQ_CST);
#ifdef __linux__
    if (__atomic_load_n(bell + 1, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, bell, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);  /* shared, not private: other processes */
#endif
}

static void sleep_on(int32_t *bell, int32_t seen, int64_t ns) {
#ifdef __linux__
    __atomic_store_n(bell + 1, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(bell, __ATOMIC_SEQ_CST) == seen) {
        struct timespec ts = {ns / 1000000000LL, ns % 1000000000LL};
        syscall(SYS_futex, bell, FUTEX_WAIT, seen, &ts, NULL, 0);
    }
    __atomic_store_n(bell + 1, 0, __ATOMIC_SEQ_CST);
#else
    (void)bell; (void)seen;
    struct timespec ts = {0, ns < 50000 ? ns : 50000};
    nanosleep(&ts, NULL);
#endif
}

/* base: the mapped segment; hdr0 / slot0: byte offsets of the pair headers and the slots. src / dst: the
   caller's send and receive buffers; s_end[d] / r_end[d]: where the bytes for / from rank d end in them;
   tx[d] / rx[d]: the next byte to send to / take from d, advanced in place (done when equal to the end).
   The caller copies its own rows (d == me) and passes tx[me] == s_end[me], rx[me] == r_end[me]. */
int shm_a2a(char *base, int64_t hdr0, int64_t slot0, int64_t slot_bytes, int world, int me,
            const char *src, char *dst, const int64_t *s_end, const int64_t *r_end, int64_t *tx, int64_t *rx,
            int64_t spin_ns, int64_t slice_ns) {
    int32_t *bell = bell_of(base, me);
    const int64_t t0 = now_ns();
    int64_t idle_since = 0;
    for (;;) {
        const int32_t seen = __atomic_load_n(bell, __ATOMIC_ACQUIRE);
        int pending = 0, moved = 0;
        for (int d = 0; d < world; d++) {
            if (d == me)
                continue;
            if (tx[d] < s_end[d]) {
                int64_t *h = (int64_t *)(base + hdr0 + (int64_t)(me * world + d) * REC);
                const int64_t sent = h[0];  /* ours alone */
                if (sent - __atomic_load_n(&h[1], __ATOMIC_ACQUIRE) < 2) {  /* room in the ring */
                    const int64_t n = s_end[d] - tx[d] < slot_bytes ? s_end[d] - tx[d] : slot_bytes;
                    memcpy(base + slot0 + ((int64_t)(me * world + d) * 2 + (sent & 1)) * slot_bytes, src + tx[d], n);
                    __atomic_store_n(&h[0], sent + 1, __ATOMIC_RELEASE);
                    tx[d] += n;
                    moved = 1;
                    ring(base, d);
                }
                pending |= tx[d] < s_end[d];
            }
            if (rx[d] < r_end[d]) {
                int64_t *h = (int64_t *)(base + hdr0 + (int64_t)(d * world + me) * REC);
                const int64_t taken = h[1];  /* ours alone */
                if (__atomic_load_n(&h[0], __ATOMIC_ACQUIRE) > taken) {  /* a piece has arrived */
                    const int64_t n = r_end[d] - rx[d] < slot_bytes ? r_end[d] - rx[d] : slot_bytes;
                    memcpy(dst + rx[d], base + slot0 + ((int64_t)(d * world + me) * 2 + (taken & 1)) * slot_bytes, n);
                    __atomic_store_n(&h[1], taken + 1, __ATOMIC_RELEASE);  /* the slot is free again */
                    rx[d] += n;
                    moved = 1;
                    ring(base, d);
                }
                pending |= rx[d] < r_end[d];
            }
        }
        if (!pending)
            return 0;
        if (moved) {
            idle_since = 0;
            continue;
        }
        const int64_t t = now_ns();
        if (t - t0 >= slice_ns)
            return 1;
        if (!idle_since)
            idle_since = t;
        if (t - idle_since < spin_ns) {
            cpu_relax();
            continue;
        }
        /* asleep until a peer rings, at most 2 ms (a peer on the Python loop does not ring) or the slice */
        const int64_t left = slice_ns - (t - t0);
        sleep_on(bell, seen, left < 2000000 ? left : 2000000);
    }
}
