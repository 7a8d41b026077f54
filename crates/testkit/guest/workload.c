/* workload: the guest program of qmigrate's real-guest tests (crates/testkit/src/guest/).
 *
 * Built on the host with `gcc -O2 -static` and run as the guest's init process's child. It keeps
 * memory and a disk busy in ways a test can check after a live migration, and checks itself:
 *
 * - RAM: a buffer of wl.buf MiB, page by page. Page p of generation g holds the 512 words
 *   base(p, g) + i; the generation of every page is kept in a table. wl.rate MiB/s of pages are
 *   rewritten round robin (the next generation), each page verified against its table entry
 *   before it is rewritten; a scrub reads every page once per wl.sweep ms and verifies it too.
 *   A page that does not hold what the table says (a dirty page the migration lost, a torn or
 *   stale copy) is a FAIL line.
 * - Disk: every heartbeat writes record n (4 KiB: magic, n, a pattern, FNV-1a checksum) to block
 *   n % blocks of wl.disk with O_DIRECT, then fdatasync; before that it reads record n-1 back
 *   from the disk (not from the page cache) and checks its magic, number and checksum. After a
 *   migration the first record read on the destination is one the source wrote.
 * - Console: every wl.hb ms one line
 *     HB <n> t=<ms> sum=<hex> dirtied=<MiB> sweeps=<k> rec=<ok> fail=<count>
 *   n counts heartbeats from 0; sum is the checksum of what the buffer must hold (kept
 *   incrementally from the generation table); rec counts records read back and verified; fail
 *   counts mismatches. Every completed scrub prints "SWEEP <k> pages=<n> fail=<count>".
 *   Mismatches print "FAIL <what>: <detail>" (the first 20; fail= keeps counting).
 *
 * Parameters are key=value words, from argv or else from /proc/cmdline (the kernel command line):
 *   wl.buf=MiB (32)  wl.rate=MiB/s (8; 0 dirties nothing)  wl.disk=PATH (/dev/vda; none)
 *   wl.hb=ms (100)   wl.sweep=ms (1000)  wl.check=0|1 (1: verify pages before rewriting them)
 *   wl.run=s (0: forever; for running it on the host)
 *   wl.inject=ms (0: never): after ms, damage one buffer word and the last disk record behind
 *   the workload's back, once, to show that its checks catch it (testkit's own test)
 * A rate the CPU cannot reach is dirtied as fast as it can (the HB line's dirtied= shows what
 * was reached); after a pause (a migration's downtime) it does not catch up in a burst.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define REC 4096u
#define MAX_FAIL_LINES 20

static uint64_t buf_mib = 32, rate_mib = 8, hb_ms = 100, sweep_ms = 1000, run_s = 0, check = 1, inject_ms = 0;
static char disk_path[256] = "/dev/vda";
static uint64_t fails;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fail(const char *fmt, ...) {
    fails++;
    if (fails > MAX_FAIL_LINES) return;
    va_list ap;
    va_start(ap, fmt);
    fputs("FAIL ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    va_end(ap);
    fflush(stdout);
}

static void param(const char *word) {
    const char *v = strchr(word, '=');
    if (!v || strncmp(word, "wl.", 3) != 0) return;
    size_t klen = (size_t)(v - word);
    v++;
#define KEY(k) (klen == strlen(k) && strncmp(word, k, klen) == 0)
    if (KEY("wl.buf")) buf_mib = strtoull(v, 0, 0);
    else if (KEY("wl.rate")) rate_mib = strtoull(v, 0, 0);
    else if (KEY("wl.hb")) hb_ms = strtoull(v, 0, 0);
    else if (KEY("wl.sweep")) sweep_ms = strtoull(v, 0, 0);
    else if (KEY("wl.check")) check = strtoull(v, 0, 0);
    else if (KEY("wl.run")) run_s = strtoull(v, 0, 0);
    else if (KEY("wl.inject")) inject_ms = strtoull(v, 0, 0);
    else if (KEY("wl.disk")) snprintf(disk_path, sizeof disk_path, "%s", v);
#undef KEY
}

/* ---- RAM ---- */

static uint64_t *buf;    /* pages * WORDS words */
static uint32_t *gen;    /* generation of each page */
static uint64_t pages, sum;

static uint64_t page_base(uint64_t p, uint32_t g) { return mix((p << 32) ^ g); }

/* Verifies page p against its generation; a FAIL line names the first bad word. */
static void verify_page(uint64_t p, const char *who) {
    const uint64_t *w = buf + p * WORDS, base = page_base(p, gen[p]);
    for (uint64_t i = 0; i < WORDS; i++) {
        if (w[i] != base + i) {
            fail("buffer (%s): page %llu gen %u word %llu: want %016llx got %016llx", who,
                 (unsigned long long)p, gen[p], (unsigned long long)i,
                 (unsigned long long)(base + i), (unsigned long long)w[i]);
            return;
        }
    }
}

static void write_page(uint64_t p, uint32_t g) {
    uint64_t *w = buf + p * WORDS, base = page_base(p, g);
    for (uint64_t i = 0; i < WORDS; i++) w[i] = base + i;
}

static void dirty_page(uint64_t p) {
    if (check) verify_page(p, "dirty");
    sum -= mix(page_base(p, gen[p]));
    gen[p]++;
    write_page(p, gen[p]);
    sum += mix(page_base(p, gen[p]));
}

/* ---- disk ---- */

static int disk_fd = -1;
static uint64_t blocks, rec_ok;
static unsigned char *rec;   /* REC bytes, aligned for O_DIRECT */

static uint64_t fnv1a(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static void open_disk(void) {
    if (strcmp(disk_path, "none") == 0) return;
    disk_fd = open(disk_path, O_RDWR | O_DIRECT);
    if (disk_fd < 0 && errno == EINVAL) disk_fd = open(disk_path, O_RDWR); /* tmpfs on a host */
    if (disk_fd < 0) {
        fail("disk: open %s: %s", disk_path, strerror(errno));
        return;
    }
    off_t size = lseek(disk_fd, 0, SEEK_END);
    blocks = size > 0 ? (uint64_t)size / REC : 0;
    if (blocks > 4096) blocks = 4096;
    if (blocks < 2) fail("disk: %s has %lld bytes, fewer than two records", disk_path, (long long)size);
    if (posix_memalign((void **)&rec, 4096, REC) != 0) {
        fail("disk: no memory for the record buffer");
        blocks = 0;
    }
}

static void fill_record(uint64_t n) {
    memset(rec, 0, REC);
    snprintf((char *)rec, 16, "QMIGRATE-REC");
    memcpy(rec + 16, &n, 8);
    for (size_t off = 32; off + 8 <= REC - 8; off += 8) {
        uint64_t v = mix(n ^ (off << 40));
        memcpy(rec + off, &v, 8);
    }
    uint64_t h = fnv1a(rec, REC - 8);
    memcpy(rec + REC - 8, &h, 8);
}

/* Reads record n back from the disk and checks it. */
static void verify_record(uint64_t n) {
    ssize_t got = pread(disk_fd, rec, REC, (off_t)((n % blocks) * REC));
    if (got != (ssize_t)REC) {
        fail("disk: read of record %llu: %s", (unsigned long long)n, got < 0 ? strerror(errno) : "short");
        return;
    }
    uint64_t num, h;
    memcpy(&num, rec + 16, 8);
    memcpy(&h, rec + REC - 8, 8);
    if (memcmp(rec, "QMIGRATE-REC", 12) != 0 || num != n || h != fnv1a(rec, REC - 8)) {
        fail("disk: record %llu at block %llu holds record %llu (magic %s, checksum %s)",
             (unsigned long long)n, (unsigned long long)(n % blocks), (unsigned long long)num,
             memcmp(rec, "QMIGRATE-REC", 12) == 0 ? "ok" : "bad",
             h == fnv1a(rec, REC - 8) ? "ok" : "bad");
        return;
    }
    rec_ok++;
}

static void write_record(uint64_t n) {
    fill_record(n);
    if (pwrite(disk_fd, rec, REC, (off_t)((n % blocks) * REC)) != (ssize_t)REC) {
        fail("disk: write of record %llu: %s", (unsigned long long)n, strerror(errno));
        return;
    }
    if (fdatasync(disk_fd) != 0) fail("disk: fdatasync after record %llu: %s", (unsigned long long)n, strerror(errno));
}

int main(int argc, char **argv) {
    if (argc > 1) {
        for (int i = 1; i < argc; i++) param(argv[i]);
    } else {
        static char line[4096];
        FILE *f = fopen("/proc/cmdline", "r");
        if (f && fgets(line, sizeof line, f)) {
            for (char *w = strtok(line, " \n"); w; w = strtok(0, " \n")) param(w);
        }
        if (f) fclose(f);
    }
    setvbuf(stdout, 0, _IOLBF, 0);
    if (hb_ms == 0) hb_ms = 100;
    if (sweep_ms == 0) sweep_ms = 1000;

    pages = buf_mib * (1u << 20) / PAGE;
    if (pages == 0) pages = 1;
    buf = aligned_alloc(PAGE, pages * PAGE);
    gen = calloc(pages, sizeof *gen);
    if (!buf || !gen) {
        printf("FAIL setup: cannot allocate %llu MiB\n", (unsigned long long)buf_mib);
        return 1;
    }
    for (uint64_t p = 0; p < pages; p++) {
        write_page(p, 0);
        sum += mix(page_base(p, 0));
    }
    open_disk();
    printf("WORKLOAD start buf=%lluMiB rate=%lluMiB/s hb=%llums sweep=%llums check=%llu disk=%s blocks=%llu\n",
           (unsigned long long)buf_mib, (unsigned long long)rate_mib, (unsigned long long)hb_ms,
           (unsigned long long)sweep_ms, (unsigned long long)check, disk_path, (unsigned long long)blocks);

    const uint64_t tick = 10000000ull; /* 10 ms */
    const double pages_per_ns = (double)rate_mib * 256.0 / 1e9;
    const double scrub_per_ns = (double)pages / ((double)sweep_ms * 1e6);
    const double max_credit = (double)rate_mib * 256.0 * 0.01 + 1.0; /* one tick's worth */
    uint64_t start = now_ns(), last = start, next_hb = start, next_tick = start;
    uint64_t hb = 0, dirtied = 0, dirty_at = 0, scrub_at = 0, sweeps = 0;
    double credit = 0, scrub_credit = 0;
    for (;;) {
        uint64_t now = now_ns(), dt = now - last;
        last = now;
        credit += (double)dt * pages_per_ns;
        if (credit > max_credit) credit = max_credit;
        scrub_credit += (double)dt * scrub_per_ns;
        if (scrub_credit > (double)pages / 4.0 + 1.0) scrub_credit = (double)pages / 4.0 + 1.0;
        for (uint64_t k = 1; credit >= 1.0; credit -= 1.0, k++) {
            /* A rate the CPU cannot reach must not delay the heartbeat. */
            if (k % 64 == 0 && now_ns() >= next_hb) break;
            dirty_page(dirty_at);
            dirty_at = (dirty_at + 1) % pages;
            dirtied++;
        }
        for (; scrub_credit >= 1.0; scrub_credit -= 1.0) {
            verify_page(scrub_at, "scrub");
            if (++scrub_at == pages) {
                scrub_at = 0;
                sweeps++;
                printf("SWEEP %llu pages=%llu fail=%llu\n", (unsigned long long)sweeps,
                       (unsigned long long)pages, (unsigned long long)fails);
            }
        }
        if (inject_ms && now - start >= inject_ms * 1000000ull) {
            inject_ms = 0;
            buf[(pages / 2) * WORDS + 7] ^= 1;
            if (disk_fd >= 0 && blocks >= 2 && hb > 0) {
                fill_record(hb); /* record hb where record hb-1 belongs */
                if (pwrite(disk_fd, rec, REC, (off_t)(((hb - 1) % blocks) * REC)) != (ssize_t)REC)
                    fail("disk: inject: %s", strerror(errno));
            }
            printf("INJECTED damage at t=%llu\n", (unsigned long long)((now - start) / 1000000));
        }
        if (now >= next_hb) {
            if (disk_fd >= 0 && blocks >= 2) {
                if (hb > 0) verify_record(hb - 1);
                write_record(hb);
            }
            printf("HB %llu t=%llu sum=%016llx dirtied=%llu sweeps=%llu rec=%llu fail=%llu\n",
                   (unsigned long long)hb, (unsigned long long)((now - start) / 1000000),
                   (unsigned long long)sum, (unsigned long long)(dirtied / 256),
                   (unsigned long long)sweeps, (unsigned long long)rec_ok, (unsigned long long)fails);
            hb++;
            next_hb += hb_ms * 1000000ull;
            if (next_hb < now) next_hb = now + hb_ms * 1000000ull; /* after a pause: no burst */
            if (run_s && now - start >= run_s * 1000000000ull) return fails ? 1 : 0;
        }
        next_tick += tick;
        now = now_ns();
        if (next_tick > now) {
            uint64_t d = next_tick - now;
            struct timespec ts = {(time_t)(d / 1000000000ull), (long)(d % 1000000000ull)};
            nanosleep(&ts, 0);
        } else {
            next_tick = now; /* behind (a rate the CPU cannot reach): no sleep */
        }
    }
}
