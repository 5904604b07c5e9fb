/*
 * loadgen.c - closed-loop load generator for the Postfix policy protocol, and a
 * trivial "null" policy server used to measure the generator's own ceiling.
 *
 * Compiled at run time by benchmarks/run.py (cc -O2); it is not a product.
 * One thread, epoll, libc + libm.  Each connection acts like one Postfix smtpd
 * process: the connection stays open and carries one request at a time.
 *
 * Requests come from a template (a captured Postfix request in which run.py has
 * replaced variable values by @USER@ @RCPT@ @PORT@ @INST@ @QID@ @RCOUNT@ markers).
 * Every reply is checked strictly: "action=<non-empty>\n\n" and nothing else.
 * The result is one JSON object on stdout; diagnostics go to stderr.
 *
 *   loadgen run  --port P --template FILE [options]     (see usage())
 *   loadgen serve --port P                               (answers every request DUNNO)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define OUT_MAX 4096
#define IN_MAX 512
#define MAX_WATCH 8
#define MAX_WORDS 16
#define MAX_SEGS 64

/* ------------------------------------------------------------ small helpers */
static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t rng = 88172645463325252ull;
static uint64_t rnd64(void) /* splitmix64: good enough and branch-free */
{
    uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static uint32_t rnd_below(uint32_t n) { return (uint32_t)((rnd64() >> 32) * n >> 32); }
static double rnd_unit(void) { return (double)(rnd64() >> 11) / 9007199254740992.0; }

static void die(const char *what)
{
    perror(what);
    exit(2);
}

/* a growable array of latencies in units of 100 ns (uint32: up to 7 minutes) */
struct samples {
    uint32_t *v;
    size_t n, cap;
};
static void samples_add(struct samples *s, uint64_t ns)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1 << 16;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        if (!s->v) die("realloc");
    }
    uint64_t t = ns / 100;
    s->v[s->n++] = t > UINT32_MAX ? UINT32_MAX : (uint32_t)t;
}
static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}
/* nearest-rank percentile, in microseconds, of a sorted sample set */
static double rank_us(const struct samples *s, double q)
{
    if (!s->n) return 0;
    size_t k = (size_t)ceil(q * (double)s->n);
    if (k < 1) k = 1;
    if (k > s->n) k = s->n;
    return s->v[k - 1] / 10.0;
}
static void print_latency(const char *name, struct samples *s)
{
    qsort(s->v, s->n, sizeof *s->v, cmp_u32);
    double sum = 0;
    for (size_t i = 0; i < s->n; i++) sum += s->v[i];
    printf("\"%s\":{\"n\":%zu,\"mean_us\":%.1f,\"p50_us\":%.1f,\"p90_us\":%.1f,"
           "\"p99_us\":%.1f,\"p999_us\":%.1f,\"max_us\":%.1f}",
           name, s->n, s->n ? sum / (double)s->n / 10.0 : 0.0, rank_us(s, 0.5), rank_us(s, 0.9),
           rank_us(s, 0.99), rank_us(s, 0.999), s->n ? s->v[s->n - 1] / 10.0 : 0.0);
}

/* CPU ticks (utime + stime, all threads) of another process, -1 if gone */
static long long proc_ticks(int pid)
{
    char path[48], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    /* the command name may contain spaces and parentheses: start after the last ')' */
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    p++;
    long long ut = -1, st = -1;
    for (int field = 3; field <= 15 && p; field++) {
        while (*p == ' ') p++;
        if (field == 14) ut = strtoll(p, NULL, 10);
        if (field == 15) st = strtoll(p, NULL, 10);
        p = strchr(p, ' ');
    }
    return (ut < 0 || st < 0) ? -1 : ut + st;
}

static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* busy, interrupt (irq + softirq) and total jiffies of the whole machine, from
 * /proc/stat; loopback TCP work done in softirq context is charged to no process */
static void machine_ticks(unsigned long long *busy, unsigned long long *intr,
                          unsigned long long *steal, unsigned long long *total)
{
    unsigned long long v[8] = {0};
    *busy = *intr = *steal = *total = 0;
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return;
    int got = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                     &v[3], &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (got < 5) return;
    for (int i = 0; i < 8; i++) *total += v[i];
    *busy = *total - v[3] - v[4]; /* minus idle and iowait */
    *intr = v[5] + v[6];
    *steal = v[7]; /* time the hypervisor gave to other guests */
}

static int tcp_listen(const char *host, int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", host);
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(fd, 1024) < 0) die("listen");
    return fd;
}

static volatile sig_atomic_t stop_requested;
static void on_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
}

/* ================================================================ serve mode */
/* Trivial policy server: one reply per empty line, no parsing at all.  It is the
 * cheapest server the generator can meet, so run.py uses it to show how fast the
 * generator itself can go on this machine. */
struct sconn {
    int fd;
    int last_nl; /* the previous byte read was '\n' */
};

static int serve_main(const char *host, int port)
{
    static const char reply[] = "action=DUNNO\n\n";
    int lfd = tcp_listen(host, port);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_stop);
    signal(SIGINT, on_stop);
    struct epoll_event evs[256];
    char buf[16384], out[sizeof reply * 64];
    while (!stop_requested) {
        int n = epoll_wait(ep, evs, 256, 200);
        for (int i = 0; i < n; i++) {
            struct sconn *c = evs[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    struct sconn *nc = calloc(1, sizeof *nc);
                    if (!nc) die("calloc");
                    nc->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            ssize_t r = recv(c->fd, buf, sizeof buf, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) {
                close(c->fd); /* closing removes it from the epoll set */
                free(c);
                continue;
            }
            size_t replies = 0;
            for (ssize_t k = 0; k < r; k++) {
                int nl = buf[k] == '\n';
                if (nl && c->last_nl) {
                    replies++;
                    nl = 0; /* "\n\n\n" is one request end, not two */
                }
                c->last_nl = nl;
            }
            size_t len = 0;
            while (replies-- && len + sizeof reply - 1 <= sizeof out) {
                memcpy(out + len, reply, sizeof reply - 1);
                len += sizeof reply - 1;
            }
            /* a reply is 14 bytes: a blocking-free send of it does not come back short */
            if (len && send(c->fd, out, len, MSG_NOSIGNAL) < 0) {
                close(c->fd);
                free(c);
            }
        }
    }
    return 0;
}

/* ================================================================== run mode */
enum { SEG_TEXT, SEG_USER, SEG_RCPT, SEG_PORT, SEG_INST, SEG_QID, SEG_RCOUNT };
static const char *const marker_names[] = {"", "@USER@", "@RCPT@", "@PORT@",
                                           "@INST@", "@QID@", "@RCOUNT@"};
struct seg {
    int kind;
    const char *text;
    size_t len;
};
static struct seg segs[MAX_SEGS];
static int nsegs;

static void load_template(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    static char tpl[OUT_MAX];
    size_t n = fread(tpl, 1, sizeof tpl - 1, f);
    fclose(f);
    tpl[n] = 0;
    const char *p = tpl;
    while (*p) {
        const char *best = NULL;
        int kind = 0;
        for (int k = SEG_USER; k <= SEG_RCOUNT; k++) {
            const char *m = strstr(p, marker_names[k]);
            if (m && (!best || m < best)) {
                best = m;
                kind = k;
            }
        }
        if (nsegs + 2 >= MAX_SEGS) {
            fprintf(stderr, "template has too many markers\n");
            exit(2);
        }
        size_t textlen = best ? (size_t)(best - p) : strlen(p);
        if (textlen) segs[nsegs++] = (struct seg){SEG_TEXT, p, textlen};
        if (!best) break;
        segs[nsegs++] = (struct seg){kind, NULL, 0};
        p = best + strlen(marker_names[kind]);
    }
}

enum { CS_DOWN, CS_CONNECTING, CS_READY, CS_SENDING, CS_WAITING };
enum { PH_WARMUP, PH_MEASURE, PH_DRAIN };

struct conn {
    int fd, state, index;
    int ever_replied, fresh, cold; /* fresh: no reply yet on this TCP connection */
    uint32_t out_len, out_off, in_len;
    uint64_t sent_at, retry_at;
    /* the message being sent: RCPT sends --rcpts requests per message */
    uint64_t sender;
    uint32_t left_in_msg, msg_no;
    uint16_t client_port;
    char inst[48], qid[16];
    char out[OUT_MAX];
    char in[IN_MAX];
};

/* options */
static const char *o_host = "127.0.0.1", *o_template, *o_dist = "uniform", *o_label = "";
static int o_port, o_conns = 1, o_data, o_rcpts = 1, o_npids;
static int o_pids[MAX_WATCH];
static double o_duration = 10, o_warmup = 1, o_timeout_ms = 10000, o_zipf_s = 1.0;
static double o_cold_frac, o_progress, o_drain_s = 5;
static int o_burst = 4;
static uint64_t o_senders = 10000, o_requests, o_offset, o_cold_base = 100000000;

/* state */
static struct conn *conns;
static int ep;
static struct sockaddr_in server;
static int phase = PH_WARMUP;
static double *zipf_cdf;
static uint64_t seq_next, cold_next, issued_measured;
static int pending_first; /* open connections still waiting for their first reply */
static struct samples lat_hot, lat_cold;
static uint64_t win_replies;                 /* replies completed inside the window */
static uint64_t total_sent, total_replies, total_counted;
static uint64_t err_connect, err_closed, err_malformed, err_timeout;
static struct {
    char word[24];
    uint64_t n;
} words[MAX_WORDS];
static int nwords;
static char bad_sample[128];

static uint64_t pick_sender(int *cold)
{
    *cold = 0;
    if (o_cold_frac > 0 && rnd_unit() < o_cold_frac) {
        *cold = 1;
        return o_cold_base + cold_next++;
    }
    if (o_dist[0] == 's') return o_offset + (seq_next++ % o_senders);
    if (!zipf_cdf) return o_offset + rnd_below((uint32_t)o_senders);
    double u = rnd_unit();
    size_t lo = 0, hi = o_senders - 1;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (zipf_cdf[mid] < u) lo = mid + 1;
        else hi = mid;
    }
    return o_offset + lo;
}

static char *put_u(char *p, uint64_t v)
{
    char tmp[24];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10);
    while (v /= 10);
    while (n) *p++ = tmp[--n];
    return p;
}

static char *put_user(char *p, uint64_t id)
{
    memcpy(p, "user", 4);
    p = put_u(p + 4, id);
    memcpy(p, "@dom", 4);
    p = put_u(p + 4, id % 97);
    memcpy(p, ".example", 8);
    return p + 8;
}

static void start_message(struct conn *c)
{
    static const char hex[] = "0123456789ABCDEF";
    c->sender = pick_sender(&c->cold);
    c->left_in_msg = o_data ? 1 : (uint32_t)o_rcpts;
    c->client_port = (uint16_t)(1024 + rnd_below(64511));
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    /* Postfix's instance: smtpd pid, time, microseconds, message number (hex) */
    snprintf(c->inst, sizeof c->inst, "%x.%lx.%lx.%x", 4000 + c->index, (long)ts.tv_sec,
             ts.tv_nsec / 1000, c->msg_no++);
    uint64_t r = rnd64();
    for (int i = 0; i < 11; i++) c->qid[i] = hex[(r >> (4 * i)) & 15];
    c->qid[11] = 0;
}

static uint32_t build_request(struct conn *c)
{
    if (c->left_in_msg == 0) start_message(c);
    c->left_in_msg--;
    char *p = c->out;
    for (int i = 0; i < nsegs; i++) {
        const struct seg *s = &segs[i];
        switch (s->kind) {
        case SEG_TEXT: memcpy(p, s->text, s->len); p += s->len; break;
        case SEG_USER: p = put_user(p, c->sender); break;
        case SEG_RCPT:
            memcpy(p, "rcpt", 4);
            p = put_u(p + 4, rnd_below(1000000));
            memcpy(p, "@remote", 7);
            p = put_u(p + 7, rnd_below(1000));
            memcpy(p, ".example", 8);
            p += 8;
            break;
        case SEG_PORT: p = put_u(p, c->client_port); break;
        case SEG_INST: p = stpcpy(p, c->inst); break;
        case SEG_QID: p = stpcpy(p, c->qid); break;
        case SEG_RCOUNT: p = put_u(p, (uint64_t)o_rcpts); break;
        }
    }
    return (uint32_t)(p - c->out);
}

static void count_word(const char *v, size_t n)
{
    char w[24];
    size_t k = 0;
    while (k < n && k < sizeof w - 1 && v[k] != ' ' && v[k] != '\t') {
        char ch = v[k];
        w[k++] = (ch >= 'a' && ch <= 'z') ? (char)(ch - 32) : ch;
    }
    w[k] = 0;
    for (int i = 0; i < nwords; i++)
        if (!strcmp(words[i].word, w)) {
            words[i].n++;
            return;
        }
    int slot = nwords < MAX_WORDS ? nwords++ : MAX_WORDS - 1;
    if (slot == MAX_WORDS - 1) strcpy(words[slot].word, "~MANY~");
    else memcpy(words[slot].word, w, k + 1);
    words[slot].n++;
}

static void keep_bad_sample(const char *why, const struct conn *c)
{
    if (bad_sample[0]) return;
    size_t k = (size_t)snprintf(bad_sample, sizeof bad_sample, "%s: ", why);
    for (uint32_t i = 0; i < c->in_len && k + 5 < sizeof bad_sample; i++) {
        unsigned char ch = (unsigned char)c->in[i];
        if (ch >= 32 && ch < 127 && ch != '"' && ch != '\\') bad_sample[k++] = (char)ch;
        else k += (size_t)snprintf(bad_sample + k, sizeof bad_sample - k, "\\\\x%02x", ch);
    }
    bad_sample[k < sizeof bad_sample ? k : sizeof bad_sample - 1] = 0;
}

static void drop(struct conn *c, uint64_t retry_at)
{
    if (c->fd >= 0) close(c->fd);
    if (c->fd >= 0 && c->fresh) pending_first--;
    c->fresh = 0;
    c->fd = -1;
    c->state = CS_DOWN;
    c->retry_at = retry_at;
    c->in_len = 0;
}

static void want_write(struct conn *c, int on)
{
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0u), .data.u32 = (uint32_t)c->index};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void open_conn(struct conn *c, uint64_t now)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&server, sizeof server) < 0 && errno != EINPROGRESS) {
        err_connect++;
        drop(c, now + 200000000u);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)c->index};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
    c->state = CS_CONNECTING;
    c->fresh = 1;
    pending_first++;
}

/* Open closed connections, but keep at most --burst of them waiting for their first
 * reply: a burst of connects overflows a small listen backlog (socketserver's
 * default is 5, and a thread-per-connection server accepts slowly while its busy
 * threads hold the GIL), and the overflow costs seconds of TCP retransmissions.
 * Postfix's smtpd processes do not connect all at once either. */
static void open_more(uint64_t now)
{
    for (int i = 0; i < o_conns && pending_first < o_burst; i++) {
        struct conn *c = &conns[i];
        if (c->state == CS_DOWN && now >= c->retry_at && phase != PH_DRAIN && !stop_requested)
            open_conn(c, now);
    }
}

static void flush_out(struct conn *c, uint64_t now)
{
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_off += (uint32_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            if (c->state != CS_SENDING) want_write(c, 1);
            c->state = CS_SENDING;
            return;
        } else {
            err_closed++;
            drop(c, now + 100000000u);
            return;
        }
    }
    if (c->state == CS_SENDING) want_write(c, 0);
    c->state = CS_WAITING;
}

static int may_send(void)
{
    if (stop_requested || phase == PH_DRAIN) return 0;
    if (phase == PH_MEASURE && o_requests && issued_measured >= o_requests) return 0;
    return 1;
}

static void send_next(struct conn *c, uint64_t now)
{
    c->state = CS_READY;
    if (!may_send()) return;
    c->out_len = build_request(c);
    c->out_off = 0;
    c->sent_at = mono_ns();
    total_sent++;
    if (phase == PH_MEASURE) issued_measured++;
    c->state = CS_WAITING; /* flush_out moves it to CS_SENDING if the write is short */
    flush_out(c, now);
}

static void on_reply_bytes(struct conn *c, uint64_t now)
{
    for (;;) {
        if (c->in_len == IN_MAX) {
            err_malformed++;
            keep_bad_sample("reply too long", c);
            drop(c, now);
            return;
        }
        ssize_t n = recv(c->fd, c->in + c->in_len, IN_MAX - c->in_len, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) {
            err_closed++;
            drop(c, now + 100000000u);
            return;
        }
        c->in_len += (uint32_t)n;
        if (c->state != CS_WAITING) {
            err_malformed++;
            keep_bad_sample("bytes without a request", c);
            drop(c, now);
            return;
        }
        /* a complete reply is "action=V\n\n"; anything else (CR, a second line
         * with content, bytes after the blank line) is a protocol violation */
        char *nl = memchr(c->in, '\n', c->in_len);
        uint32_t prefix = c->in_len < 7 ? c->in_len : 7;
        if (memcmp(c->in, "action=", prefix) != 0 || memchr(c->in, '\r', c->in_len)) {
            err_malformed++;
            keep_bad_sample("not action=", c);
            drop(c, now);
            return;
        }
        if (!nl || (uint32_t)(nl - c->in) + 1 >= c->in_len) continue; /* need more bytes */
        uint32_t vlen = (uint32_t)(nl - c->in) - 7;
        if (nl[1] != '\n' || (uint32_t)(nl - c->in) + 2 != c->in_len || vlen == 0) {
            err_malformed++;
            keep_bad_sample("malformed", c);
            drop(c, now);
            return;
        }
        uint64_t t = mono_ns();
        uint64_t d = t - c->sent_at;
        total_replies++;
        c->ever_replied = 1;
        if (c->fresh) {
            c->fresh = 0;
            pending_first--;
            open_more(now);
        }
        total_counted += o_data ? (uint64_t)o_rcpts : 1;
        if (phase != PH_WARMUP) {
            samples_add(c->cold ? &lat_cold : &lat_hot, d);
            count_word(c->in + 7, vlen);
            if (phase == PH_MEASURE) win_replies++;
        }
        c->in_len = 0;
        send_next(c, now);
        return;
    }
}

static void usage(void)
{
    fputs("usage: loadgen run --port P --template FILE [--host A] [--conns N]\n"
          "         [--duration S] [--warmup S] [--requests N] [--senders N]\n"
          "         [--dist uniform|zipf|seq] [--zipf-s X] [--offset N] [--state RCPT|DATA]\n"
          "         [--rcpts N] [--cold-frac F] [--cold-base N] [--timeout-ms MS]\n"
          "         [--drain S] [--pid PID]... [--seed N] [--progress S] [--label L]\n"
          "         [--burst N]  (connections allowed to wait for a first reply, 4)\n"
          "       loadgen serve --port P [--host A]\n",
          stderr);
    exit(2);
}

static int run_main(void)
{
    if (!o_template || !o_port || o_conns < 1 || o_senders < 1 || o_rcpts < 1) usage();
    load_template(o_template);
    if (!strcmp(o_dist, "zipf")) {
        zipf_cdf = malloc(sizeof(double) * o_senders);
        if (!zipf_cdf) die("malloc");
        double acc = 0;
        for (uint64_t i = 0; i < o_senders; i++) zipf_cdf[i] = (acc += pow((double)(i + 1), -o_zipf_s));
        for (uint64_t i = 0; i < o_senders; i++) zipf_cdf[i] /= acc;
    } else if (strcmp(o_dist, "uniform") && strcmp(o_dist, "seq")) {
        usage();
    }
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)o_port);
    if (inet_pton(AF_INET, o_host, &server.sin_addr) != 1) usage();
    struct rlimit rl;
    if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur < (rlim_t)o_conns + 32) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_stop);
    signal(SIGTERM, on_stop);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    conns = calloc((size_t)o_conns, sizeof *conns);
    if (!conns) die("calloc");

    uint64_t t_start = mono_ns(), now = t_start;
    for (int i = 0; i < o_conns; i++) {
        conns[i].index = i;
        conns[i].fd = -1;
        conns[i].retry_at = now;
    }
    open_more(now);
    /* The window opens after the warm-up and (unless a request count is the goal)
     * once every connection has had a reply,
     * but never later than 20 s after the start: a burst of connects to a server with
     * a small listen backlog (socketserver's default is 5) can leave some of them
     * waiting for TCP retransmissions for seconds.  That ramp is reported on its own
     * (ramp_s) instead of polluting the latency of the measured window. */
    uint64_t warm_end = t_start + (uint64_t)(o_warmup * 1e9);
    uint64_t win_start = 0, win_end = 0, drain_end = 0, next_scan = now, next_progress = 0;
    uint64_t timeout_ns = (uint64_t)(o_timeout_ms * 1e6);
    double cpu0 = 0, cpu1 = 0;
    long long ticks0[MAX_WATCH], ticks1[MAX_WATCH];
    unsigned long long mb0 = 0, mi0 = 0, ms0 = 0, mt0 = 0, mb1 = 0, mi1 = 0, ms1 = 0, mt1 = 0;
    uint64_t progress_last = 0, ramp_ns = 0;
    int all_up = 0;
    struct epoll_event evs[512];

    for (;;) {
        now = mono_ns();
        if (!all_up) {
            all_up = 1;
            for (int i = 0; i < o_conns && all_up; i++) all_up = conns[i].ever_replied;
            if (all_up) ramp_ns = now - t_start;
        }
        if (phase == PH_WARMUP &&
            ((now >= warm_end && (all_up || o_requests)) || now >= t_start + 20000000000u ||
             stop_requested)) {
            phase = PH_MEASURE;
            win_start = now;
            cpu0 = self_cpu_s();
            for (int i = 0; i < o_npids; i++) ticks0[i] = proc_ticks(o_pids[i]);
            machine_ticks(&mb0, &mi0, &ms0, &mt0);
            next_progress = now + (uint64_t)(o_progress * 1e9);
            /* connections parked while nothing could be sent resume here */
            for (int i = 0; i < o_conns; i++)
                if (conns[i].state == CS_READY) send_next(&conns[i], now);
        }
        int done_by_count = o_requests && issued_measured >= o_requests;
        if (phase == PH_MEASURE &&
            (stop_requested || (!o_requests && now >= win_start + (uint64_t)(o_duration * 1e9)) ||
             (done_by_count && win_replies + err_closed + err_malformed + err_timeout >= o_requests))) {
            phase = PH_DRAIN;
            win_end = now;
            cpu1 = self_cpu_s();
            for (int i = 0; i < o_npids; i++) ticks1[i] = proc_ticks(o_pids[i]);
            machine_ticks(&mb1, &mi1, &ms1, &mt1);
            drain_end = now + (uint64_t)(o_drain_s * 1e9);
        }
        if (phase == PH_DRAIN) {
            int busy = 0;
            for (int i = 0; i < o_conns && !busy; i++)
                busy = conns[i].state == CS_SENDING || conns[i].state == CS_WAITING;
            if (!busy || now >= drain_end) break;
        }
        if (now >= next_scan) { /* timeouts and reconnects, every 20 ms */
            for (int i = 0; i < o_conns; i++) {
                struct conn *c = &conns[i];
                if ((c->state == CS_SENDING || c->state == CS_WAITING) && now > c->sent_at &&
                    now - c->sent_at > timeout_ns) {
                    err_timeout++;
                    keep_bad_sample("timeout", c);
                    drop(c, now);
                }
            }
            open_more(now);
            next_scan = now + 20000000u;
        }
        if (o_progress > 0 && phase == PH_MEASURE && now >= next_progress) {
            fprintf(stderr, "loadgen %s: %.1fs %llu replies (+%llu) errors %llu\n", o_label,
                    (double)(now - win_start) / 1e9, (unsigned long long)win_replies,
                    (unsigned long long)(win_replies - progress_last),
                    (unsigned long long)(err_closed + err_malformed + err_timeout + err_connect));
            progress_last = win_replies;
            next_progress = now + (uint64_t)(o_progress * 1e9);
        }
        int n = epoll_wait(ep, evs, 512, 5);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        now = mono_ns();
        for (int i = 0; i < n; i++) {
            struct conn *c = &conns[evs[i].data.u32];
            if (c->fd < 0) continue;
            if (c->state == CS_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    err_connect++;
                    drop(c, now + 200000000u);
                    continue;
                }
                c->state = CS_SENDING; /* so want_write() below switches EPOLLOUT off */
                want_write(c, 0);
                send_next(c, now);
                continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_reply_bytes(c, now);
            if (c->fd >= 0 && (evs[i].events & EPOLLOUT) && c->state == CS_SENDING) flush_out(c, now);
        }
    }

    /* ------------------------------------------------------------- report */
    uint64_t unanswered = 0;
    for (int i = 0; i < o_conns; i++) {
        if (conns[i].state == CS_SENDING || conns[i].state == CS_WAITING) unanswered++;
        if (conns[i].fd >= 0) close(conns[i].fd);
    }
    double secs = (double)(win_end - win_start) / 1e9;
    if (secs <= 0) secs = 1e-9;
    long hz = sysconf(_SC_CLK_TCK);
    double cpu = cpu1 - cpu0;
    struct samples all = {0};
    all.cap = lat_hot.n + lat_cold.n + 1;
    all.v = malloc(all.cap * sizeof *all.v);
    if (!all.v) die("malloc");
    if (lat_hot.n) memcpy(all.v, lat_hot.v, lat_hot.n * sizeof *all.v);
    if (lat_cold.n) memcpy(all.v + lat_hot.n, lat_cold.v, lat_cold.n * sizeof *all.v);
    all.n = lat_hot.n + lat_cold.n;

    printf("{\"label\":\"%s\",\"conns\":%d,\"senders\":%llu,\"dist\":\"%s\",\"state\":\"%s\","
           "\"rcpts\":%d,\"cold_frac\":%g,",
           o_label, o_conns, (unsigned long long)o_senders, o_dist, o_data ? "DATA" : "RCPT", o_rcpts,
           o_cold_frac);
    printf("\"ramp_s\":%.3f,", all_up ? (double)ramp_ns / 1e9 : -1.0);
    printf("\"window_s\":%.4f,\"window_replies\":%llu,\"rate\":%.1f,", secs,
           (unsigned long long)win_replies, (double)win_replies / secs);
    print_latency("latency", &all);
    putchar(',');
    print_latency("latency_hot", &lat_hot);
    putchar(',');
    print_latency("latency_cold", &lat_cold);
    printf(",\"actions\":{");
    for (int i = 0; i < nwords; i++)
        printf("%s\"%s\":%llu", i ? "," : "", words[i].word, (unsigned long long)words[i].n);
    printf("},\"errors\":{\"connect\":%llu,\"closed\":%llu,\"malformed\":%llu,\"timeout\":%llu,"
           "\"unanswered_at_end\":%llu},\"bad_sample\":\"%s\",",
           (unsigned long long)err_connect, (unsigned long long)err_closed,
           (unsigned long long)err_malformed, (unsigned long long)err_timeout,
           (unsigned long long)unanswered, bad_sample);
    printf("\"total_sent\":%llu,\"total_replies\":%llu,\"total_counted\":%llu,",
           (unsigned long long)total_sent, (unsigned long long)total_replies,
           (unsigned long long)total_counted);
    printf("\"loadgen_cpu_s\":%.3f,\"loadgen_cpu_pct\":%.1f,\"loadgen_cpu_us_per_req\":%.2f,", cpu,
           100.0 * cpu / secs, win_replies ? cpu * 1e6 / (double)win_replies : 0.0);
    printf("\"watched\":[");
    for (int i = 0; i < o_npids; i++) {
        double s = (ticks0[i] < 0 || ticks1[i] < 0) ? -1.0 : (double)(ticks1[i] - ticks0[i]) / (double)hz;
        printf("%s{\"pid\":%d,\"cpu_s\":%.3f}", i ? "," : "", o_pids[i], s);
    }
    double mt = mt1 > mt0 ? (double)(mt1 - mt0) : 0.0;
    printf("],\"machine_busy_pct\":%.1f,\"machine_intr_pct\":%.1f,\"machine_steal_pct\":%.1f,"
           "\"ncpu\":%ld}\n",
           mt > 0 ? 100.0 * (double)(mb1 - mb0) / mt : 0.0,
           mt > 0 ? 100.0 * (double)(mi1 - mi0) / mt : 0.0,
           mt > 0 ? 100.0 * (double)(ms1 - ms0) / mt : 0.0, sysconf(_SC_NPROCESSORS_ONLN));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) usage();
    const char *mode = argv[1];
    static const struct option opts[] = {
        {"host", 1, 0, 'h'},     {"port", 1, 0, 'p'},      {"conns", 1, 0, 'c'},
        {"duration", 1, 0, 'd'}, {"warmup", 1, 0, 'w'},    {"requests", 1, 0, 'n'},
        {"senders", 1, 0, 's'},  {"dist", 1, 0, 'D'},      {"zipf-s", 1, 0, 'z'},
        {"offset", 1, 0, 'o'},   {"state", 1, 0, 'S'},     {"rcpts", 1, 0, 'r'},
        {"cold-frac", 1, 0, 'f'}, {"cold-base", 1, 0, 'b'}, {"timeout-ms", 1, 0, 't'},
        {"drain", 1, 0, 'T'},    {"pid", 1, 0, 'P'},       {"seed", 1, 0, 'x'},
        {"progress", 1, 0, 'i'}, {"label", 1, 0, 'l'},     {"template", 1, 0, 'm'},
        {"burst", 1, 0, 'B'},
        {0, 0, 0, 0}};
    int opt;
    optind = 2;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'h': o_host = optarg; break;
        case 'p': o_port = atoi(optarg); break;
        case 'c': o_conns = atoi(optarg); break;
        case 'd': o_duration = atof(optarg); break;
        case 'w': o_warmup = atof(optarg); break;
        case 'n': o_requests = strtoull(optarg, NULL, 10); break;
        case 's': o_senders = strtoull(optarg, NULL, 10); break;
        case 'D': o_dist = optarg; break;
        case 'z': o_zipf_s = atof(optarg); break;
        case 'o': o_offset = strtoull(optarg, NULL, 10); break;
        case 'S':
            if (!strcmp(optarg, "DATA")) o_data = 1;
            else if (strcmp(optarg, "RCPT")) usage();
            break;
        case 'r': o_rcpts = atoi(optarg); break;
        case 'f': o_cold_frac = atof(optarg); break;
        case 'b': o_cold_base = strtoull(optarg, NULL, 10); break;
        case 't': o_timeout_ms = atof(optarg); break;
        case 'T': o_drain_s = atof(optarg); break;
        case 'P':
            if (o_npids < MAX_WATCH) o_pids[o_npids++] = atoi(optarg);
            break;
        case 'x': rng = strtoull(optarg, NULL, 10) | 1; break;
        case 'i': o_progress = atof(optarg); break;
        case 'l': o_label = optarg; break;
        case 'm': o_template = optarg; break;
        case 'B': o_burst = atoi(optarg) > 0 ? atoi(optarg) : 1; break;
        default: usage();
        }
    }
    if (!strcmp(mode, "serve")) return o_port ? serve_main(o_host, o_port) : (usage(), 2);
    if (!strcmp(mode, "run")) return run_main();
    usage();
    return 2;
}
