/* vswitch CNI client: the compiled ``vswitch`` CNI binary, a thin client of vswitchd.
 *
 * Theory of operation (the protocol is vswitch/daemon/cniexec.py's docstring and docs/control.md;
 * this is the client's side):
 * starting Python costs ~20 ms per pod, so the runtime executes this small static binary
 * instead, and the plugin's logic (vswitch_cni.plugin, already imported) runs inside
 * vswitchd. The client forwards the invocation and executes, on the daemon's request, the
 * IPAM plugins, which must run in the runtime's context (mount namespace, CNI_PATH,
 * cgroup), not the daemon's.
 *
 *   VERSION       the bytes the Python plugin prints, compiled in (VSWITCH_VERSION_JSON,
 *                 from vswitch_cni.results by setup.py); no daemon, no stdin.
 *   otherwise     read stdin (at most MAX_PAYLOAD bytes kept), find the top-level
 *                 "socket" and "cniVersion" with a validating scanner, connect to the
 *                 socket (default VSWITCH_DEFAULT_SOCKET), send the hello line and
 *                 expect exactly HELLO_OK; then frame 'I' (environ, stdin) and serve the
 *                 daemon's frames: 'R' run an executable and answer 'D', 'O'/'E' copy to
 *                 fd 1/2, 'X' exit with the status.
 *   fallback      whenever the daemon cannot take the invocation (any argument, no
 *                 CNI_COMMAND, a document the scanner does not fully understand, no
 *                 daemon, another answer than HELLO_OK, stdin or environ too big for a
 *                 frame, 'I' not sent whole) the bytes read from stdin go into a memfd
 *                 that becomes fd 0, and the Python plugin ``vswitch-py`` beside this
 *                 binary (the directory of /proc/self/exe) is executed with the same argv
 *                 and environ. Nothing the daemon could act on has been sent then.
 *   lost daemon   once 'I' is sent whole the daemon may have done part of the work, so a
 *                 read error, EOF or protocol error is not a fallback: a CNI error (code
 *                 11) goes to stdout and the exit status is 1.
 *
 * Frames, both ways: 1 byte type, 4 bytes big-endian payload length (at most MAX_PAYLOAD,
 * checked before anything is allocated), payload. A child run for 'R' gets pipes on 0/1/2,
 * no other fd, default signal dispositions and an empty mask; its stdout and stderr are
 * each kept up to MAX_OUTPUT bytes (the child is killed with SIGKILL beyond), so that
 * 'D' (8 bytes of header, stdout, stderr) fits a frame; stderr is cut at the end when both
 * together do not fit.
 *
 * Test hook: ``vswitch --scan`` reads stdin and prints what the scanner found ("socket
 * PATH" and "cniVersion V" lines, or "fallback REASON"), for tests/cni/test_client.py.
 * Runtimes pass no arguments; any other argument means fallback.
 *
 * Hostile input: every length is checked before use, allocations are bounded by
 * MAX_PAYLOAD, every system call is retried on EINTR and its failure handled, SIGPIPE is
 * ignored here (and MSG_NOSIGNAL used) and restored for the fallback's exec.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <dirent.h>
#include <unistd.h>

#ifndef VSWITCH_VERSION_JSON
#error "VSWITCH_VERSION_JSON (the Python plugin's VERSION output) must be defined: build with setup.py"
#endif
#ifndef VSWITCH_DEFAULT_SOCKET
#error "VSWITCH_DEFAULT_SOCKET (vswitch.rpc.DEFAULT_SOCKET) must be defined: build with setup.py"
#endif

extern char **environ;

#define MAX_PAYLOAD (16u << 20)             /* bytes of a frame's payload, and of stdin kept */
#define MAX_OUTPUT (MAX_PAYLOAD - 8)        /* bytes of a child's stdout (or stderr) kept */
#define MAX_CHILD_ENV 65536                 /* env entries of an 'R' frame (-1000-E2BIG beyond) */
#define MAX_DEPTH 512                       /* nesting the scanner follows (fallback beyond) */
#define MAX_HELLO_LINE 4096                 /* bytes of the daemon's answer to the hello line */
#define HELLO_TIMEOUT_S 10                  /* connect, hello and its answer */
#define FRAME_SEND_TIMEOUT_S 300            /* each send after the hello (the daemon's D timeout) */
#define HELLO "{\"op\":\"cni_exec\",\"v\":1}\n"
#define HELLO_OK "{\"ok\":true,\"v\":1}"
#define FALLBACK_NAME "vswitch-py"
#define TRY_AGAIN 11                        /* CNI error code of a lost daemon / no plugin */
#define DEFAULT_CNI_VERSION "1.0.0"
#define START_FAILED 1000                   /* 'D' status -1000-errno: not found or not started */
#define MAX_VERSION_BYTES 64                /* a longer "cniVersion" is not one we print */

/* ------------------------------------------------------------------ process state */

static struct sigaction saved_sigpipe, saved_sigchld;
static const char *cni_command = "";
static char cni_version[MAX_VERSION_BYTES + 1] = DEFAULT_CNI_VERSION;

struct buf {
    unsigned char *data;
    size_t len, cap;
};

/* Room for ``extra`` more bytes, never beyond ``max`` in all; -1 (errno E2BIG or ENOMEM)
 * otherwise. Doubles the capacity, so appends are amortised. */
static int buf_reserve(struct buf *b, size_t extra, size_t max)
{
    if (extra > max || b->len > max - extra) {
        errno = E2BIG;
        return -1;
    }
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 65536;
    while (cap < b->len + extra)
        cap *= 2;
    if (cap > max)
        cap = max;
    unsigned char *p = realloc(b->data, cap);
    if (p == NULL)
        return -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

static int buf_append(struct buf *b, const void *p, size_t n, size_t max)
{
    if (buf_reserve(b, n, max) < 0)
        return -1;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t get_be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* ------------------------------------------------------------------ plain I/O */

/* Wait until ``fd`` is ready for ``events`` (a non-blocking fd answered EAGAIN). */
static int wait_fd(int fd, short events)
{
    struct pollfd p = {.fd = fd, .events = events};
    for (;;) {
        int n = poll(&p, 1, -1);
        if (n >= 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

/* Write all of ``p`` to ``fd`` (a pipe, file or terminal, blocking or not); -1 with errno. */
static int write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = write(fd, c, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if ((errno == EAGAIN || errno == EWOULDBLOCK) && wait_fd(fd, POLLOUT) == 0)
                continue;
            return -1;
        }
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read ``fd`` to its end into ``b``, keeping at most ``max`` bytes; returns 0 at the end,
 * 1 when more than ``max`` bytes are there (``b`` holds ``max``, the rest is unread
 * but for the bytes in ``*extra``, ``*extra_len`` of them), -1 with errno on an error. */
static int read_to_end(int fd, struct buf *b, size_t max, unsigned char *extra, size_t *extra_len)
{
    *extra_len = 0;
    for (;;) {
        if (b->len == max) {
            ssize_t r = read(fd, extra, 1);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && wait_fd(fd, POLLIN) == 0)
                continue;
            if (r < 0)
                return -1;
            *extra_len = (size_t)r;
            return r > 0;
        }
        if (buf_reserve(b, b->len < max - 65536 ? 65536 : max - b->len, max) < 0)
            return -1;
        ssize_t r = read(fd, b->data + b->len, b->cap - b->len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if ((errno == EAGAIN || errno == EWOULDBLOCK) && wait_fd(fd, POLLIN) == 0)
                continue;
            return -1;
        }
        if (r == 0)
            return 0;
        b->len += (size_t)r;
    }
}

/* ------------------------------------------------------------------ CNI errors */

/* ``s`` as the inside of a JSON string: printable ASCII as is, '"' and '\' escaped,
 * control bytes as \u00XX, bytes >= 0x80 as '?' (this text may hold a path in any
 * encoding; the output must be valid UTF-8). */
static void json_escape(char *out, size_t outsz, const char *s)
{
    size_t o = 0;
    for (; *s && o + 7 < outsz; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[o++] = '\\';
            out[o++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            o += (size_t)snprintf(out + o, outsz - o, "\\u%04x", c);
        } else {
            out[o++] = c < 0x80 ? (char)c : '?';
        }
    }
    out[o] = '\0';
}

/* Print a CNI error result (code ``code``, this message) to stdout and exit 1. */
static void cni_error_exit(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void cni_error_exit(int code, const char *fmt, ...)
{
    char msg[2048], esc[7 * sizeof msg], ver[7 * sizeof cni_version], out[sizeof esc + sizeof ver + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_escape(esc, sizeof esc, msg);
    json_escape(ver, sizeof ver, cni_version);
    int n = snprintf(out, sizeof out, "{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":\"%s\"}\n", ver, code, esc);
    if (n > 0)
        (void)write_all(1, out, (size_t)n < sizeof out ? (size_t)n : sizeof out - 1);
    exit(1);
}

/* The daemon was reached and 'I' sent: the outcome is unknown, so no fallback. */
static void lost(const char *reason) __attribute__((noreturn));
static void lost(const char *reason)
{
    cni_error_exit(TRY_AGAIN, "vswitch CNI client: lost vswitchd during %s: %s", cni_command, reason);
}

/* ------------------------------------------------------------------ fallback */

/* An fd holding ``b`` (and the rest of fd 0 when ``rest``: stdin was longer than kept),
 * at offset 0: a memfd, or an unlinked temporary file where memfd_create is missing. */
static int replay_fd(const struct buf *b, const unsigned char *extra, size_t extra_len, int rest)
{
    int fd = -1;
#ifdef SYS_memfd_create
    fd = (int)syscall(SYS_memfd_create, "vswitch-cni-stdin", 1u /* MFD_CLOEXEC */);
#endif
    if (fd < 0) {
        const char *tmp = getenv("TMPDIR");
        char path[PATH_MAX];
        if (snprintf(path, sizeof path, "%s/vswitch-cni-stdin.XXXXXX", tmp && *tmp ? tmp : "/tmp")
            >= (int)sizeof path)
            return -1;
        fd = mkostemp(path, O_CLOEXEC);
        if (fd < 0 || unlink(path) < 0) {
            int e = errno;
            if (fd >= 0)
                close(fd);
            errno = e;
            return -1;
        }
    }
    if (write_all(fd, b->data, b->len) < 0 || write_all(fd, extra, extra_len) < 0)
        goto fail;
    if (rest) {
        char chunk[65536];
        for (;;) {
            ssize_t r = read(0, chunk, sizeof chunk);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && wait_fd(0, POLLIN) == 0)
                continue;
            if (r < 0)
                goto fail;
            if (r == 0)
                break;
            if (write_all(fd, chunk, (size_t)r) < 0)
                goto fail;
        }
    }
    if (lseek(fd, 0, SEEK_SET) < 0)
        goto fail;
    return fd;
fail:;
    int e = errno;
    close(fd);
    errno = e;
    return -1;
}

/* Execute the Python plugin beside this binary with the same argv and environ; ``b``
 * (NULL: stdin was not read) replayed on fd 0. Does not return. */
static void fallback(char **argv, const struct buf *b, const unsigned char *extra, size_t extra_len,
                     int rest) __attribute__((noreturn));
static void fallback(char **argv, const struct buf *b, const unsigned char *extra, size_t extra_len,
                     int rest)
{
    char self[PATH_MAX], path[PATH_MAX + sizeof FALLBACK_NAME];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self);
    if (n < 0 || (size_t)n >= sizeof self) {
        cni_error_exit(TRY_AGAIN, "vswitch CNI client: cannot start the Python plugin <directory of "
                       "/proc/self/exe>/" FALLBACK_NAME ": %s",
                       n < 0 ? strerror(errno) : "the path of /proc/self/exe is too long");
    }
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (slash == NULL)
        cni_error_exit(TRY_AGAIN, "vswitch CNI client: cannot start the Python plugin beside %s: "
                       "not an absolute path", self);
    slash[1] = '\0';
    snprintf(path, sizeof path, "%s%s", self, FALLBACK_NAME);
    if (b != NULL) {
        int fd = replay_fd(b, extra, extra_len, rest);
        if (fd < 0 || dup2(fd, 0) < 0)
            cni_error_exit(TRY_AGAIN, "vswitch CNI client: cannot start the Python plugin %s: "
                           "cannot replay stdin: %s", path, strerror(errno));
        close(fd);
    }
    sigaction(SIGPIPE, &saved_sigpipe, NULL);
    sigaction(SIGCHLD, &saved_sigchld, NULL);
    execv(path, argv);
    cni_error_exit(TRY_AGAIN, "vswitch CNI client: cannot start the Python plugin %s: %s", path,
                   strerror(errno));
}

/* ------------------------------------------------------------------ the scanner */

/* Reads a whole JSON document (RFC 8259, UTF-8, no BOM) and keeps the top-level object's
 * "socket" and "cniVersion" string values. Anything not understood is refused with a
 * reason (the caller falls back): a document that is not valid JSON or not an object,
 * nesting deeper than MAX_DEPTH, a top-level key with an escape (it could spell one of
 * the two names), either name twice, a value of either that is not a string or holds an
 * escape other than \/, a value longer than its buffer. NaN and Infinity, which Python's
 * json accepts, are refused too. */
struct scanner {
    const unsigned char *p, *end;
    const char *why;                /* the reason of a refusal */
};

struct found {
    char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
    char version[MAX_VERSION_BYTES + 1];
    int has_socket, has_version;
};

static int refuse(struct scanner *s, const char *why)
{
    s->why = why;
    return -1;
}

static void skip_ws(struct scanner *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int hexval(unsigned char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* Length of the well-formed UTF-8 sequence (no overlong form, no surrogate, at most
 * U+10FFFF) starting with the byte >= 0x80 at ``p``; 0 when there is none. */
static size_t utf8_len(const unsigned char *p, const unsigned char *end)
{
    unsigned char c = p[0];
    size_t n;
    unsigned char lo = 0x80, hi = 0xbf;          /* the allowed range of the second byte */
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        if (c == 0xe0)
            lo = 0xa0;
        else if (c == 0xed)
            hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        if (c == 0xf0)
            lo = 0x90;
        else if (c == 0xf4)
            hi = 0x8f;
    } else
        return 0;
    if ((size_t)(end - p) < n || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if ((p[i] & 0xc0) != 0x80)
            return 0;
    return n;
}

/* A string at s->p (its opening quote). ``*start``/``*len``: the raw bytes between the
 * quotes; ``*escapes``: 0 none, 1 only \/, 2 any other escape. */
static int scan_string(struct scanner *s, const unsigned char **start, size_t *len, int *escapes)
{
    *escapes = 0;
    s->p++;
    *start = s->p;
    while (s->p < s->end) {
        unsigned char c = *s->p;
        if (c == '"') {
            *len = (size_t)(s->p - *start);
            s->p++;
            return 0;
        }
        if (c < 0x20)
            return refuse(s, "a control character in a string");
        if (c == '\\') {
            if (s->end - s->p < 2)
                return refuse(s, "an unterminated string");
            unsigned char e = s->p[1];
            if (e == 'u') {
                if (s->end - s->p < 6 || hexval(s->p[2]) < 0 || hexval(s->p[3]) < 0
                    || hexval(s->p[4]) < 0 || hexval(s->p[5]) < 0)
                    return refuse(s, "a bad \\u escape");
                s->p += 6;
                *escapes = 2;
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || e == '\0')
                return refuse(s, "a bad escape");
            if (e != '/')
                *escapes = 2;
            else if (*escapes == 0)
                *escapes = 1;
            s->p += 2;
            continue;
        }
        if (c >= 0x80) {
            size_t n = utf8_len(s->p, s->end);
            if (n == 0)
                return refuse(s, "invalid UTF-8");
            s->p += n;
            continue;
        }
        s->p++;
    }
    return refuse(s, "an unterminated string");
}

static int scan_digits(struct scanner *s)
{
    const unsigned char *from = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
        s->p++;
    return s->p > from ? 0 : refuse(s, "a bad number");
}

static int scan_number(struct scanner *s)
{
    if (*s->p == '-')
        s->p++;
    if (s->p < s->end && *s->p == '0')
        s->p++;
    else if (scan_digits(s) < 0)
        return -1;
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (scan_digits(s) < 0)
            return -1;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
            s->p++;
        if (scan_digits(s) < 0)
            return -1;
    }
    return 0;
}

static int scan_value(struct scanner *s, int depth);

/* An object or array at s->p, its members' values at ``depth`` + 1. */
static int scan_container(struct scanner *s, int depth)
{
    unsigned char close = *s->p == '{' ? '}' : ']';
    if (depth >= MAX_DEPTH)
        return refuse(s, "nesting deeper than the scanner follows");
    s->p++;
    skip_ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        return 0;
    }
    for (;;) {
        skip_ws(s);
        if (close == '}') {
            const unsigned char *k;
            size_t klen;
            int esc;
            if (s->p >= s->end || *s->p != '"')
                return refuse(s, "an object key that is not a string");
            if (scan_string(s, &k, &klen, &esc) < 0)
                return -1;
            skip_ws(s);
            if (s->p >= s->end || *s->p != ':')
                return refuse(s, "no ':' after an object key");
            s->p++;
        }
        if (scan_value(s, depth + 1) < 0)
            return -1;
        skip_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        if (s->p < s->end && *s->p == close) {
            s->p++;
            return 0;
        }
        return refuse(s, "no ',' or end after a member");
    }
}

static int scan_value(struct scanner *s, int depth)
{
    const unsigned char *start;
    size_t len;
    int esc;
    skip_ws(s);
    if (s->p >= s->end)
        return refuse(s, "a value is missing");
    switch (*s->p) {
    case '{':
    case '[':
        return scan_container(s, depth);
    case '"':
        return scan_string(s, &start, &len, &esc);
    case 't':
    case 'f':
    case 'n': {
        const char *word = *s->p == 't' ? "true" : *s->p == 'f' ? "false" : "null";
        size_t n = strlen(word);
        if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0)
            return refuse(s, "an unknown literal");
        s->p += n;
        return 0;
    }
    default:
        if (*s->p == '-' || (*s->p >= '0' && *s->p <= '9'))
            return scan_number(s);
        return refuse(s, "an unexpected character");
    }
}

/* The value of a top-level "socket" or "cniVersion" member at s->p, into ``out`` (``outsz``
 * bytes with the NUL), \/ decoded. */
static int scan_wanted(struct scanner *s, char *out, size_t outsz, const char *name)
{
    const unsigned char *v;
    size_t len;
    int esc;
    skip_ws(s);
    if (s->p >= s->end || *s->p != '"') {
        s->why = name[0] == 's' ? "\"socket\" is not a string" : "\"cniVersion\" is not a string";
        return -1;
    }
    if (scan_string(s, &v, &len, &esc) < 0)
        return -1;
    if (esc == 2)
        return refuse(s, name[0] == 's' ? "\"socket\" holds an escape other than \\/"
                                        : "\"cniVersion\" holds an escape other than \\/");
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        if (v[i] == '\\')
            i++;                                 /* only \/ is left: keep the '/' */
        if (o + 1 >= outsz)
            return refuse(s, name[0] == 's' ? "\"socket\" is longer than a unix socket path"
                                            : "\"cniVersion\" is too long");
        out[o++] = (char)v[i];
    }
    out[o] = '\0';
    return 0;
}

/* The whole document ``doc``: 0 and ``f`` filled, or -1 with the reason in ``*why``. */
static int scan_document(const unsigned char *doc, size_t len, struct found *f, const char **why)
{
    struct scanner s = {.p = doc, .end = doc + len, .why = NULL};
    memset(f, 0, sizeof *f);
    skip_ws(&s);
    if (s.p >= s.end || *s.p != '{') {
        *why = "the document is not a JSON object";
        return -1;
    }
    s.p++;
    skip_ws(&s);
    if (s.p < s.end && *s.p == '}')
        s.p++;
    else {
        for (;;) {
            const unsigned char *k;
            size_t klen;
            int esc;
            skip_ws(&s);
            if (s.p >= s.end || *s.p != '"') {
                s.why = "an object key that is not a string";
                goto refused;
            }
            if (scan_string(&s, &k, &klen, &esc) < 0)
                goto refused;
            if (esc) {
                s.why = "a top-level key holds an escape";
                goto refused;
            }
            skip_ws(&s);
            if (s.p >= s.end || *s.p != ':') {
                s.why = "no ':' after an object key";
                goto refused;
            }
            s.p++;
            int rc;
            if (klen == 6 && memcmp(k, "socket", 6) == 0) {
                if (f->has_socket++) {
                    s.why = "\"socket\" is given twice";
                    goto refused;
                }
                rc = scan_wanted(&s, f->socket, sizeof f->socket, "socket");
            } else if (klen == 10 && memcmp(k, "cniVersion", 10) == 0) {
                if (f->has_version++) {
                    s.why = "\"cniVersion\" is given twice";
                    goto refused;
                }
                rc = scan_wanted(&s, f->version, sizeof f->version, "cniVersion");
            } else {
                rc = scan_value(&s, 1);
            }
            if (rc < 0)
                goto refused;
            skip_ws(&s);
            if (s.p < s.end && *s.p == ',') {
                s.p++;
                continue;
            }
            if (s.p < s.end && *s.p == '}') {
                s.p++;
                break;
            }
            s.why = "no ',' or '}' after a member";
            goto refused;
        }
    }
    skip_ws(&s);
    if (s.p != s.end) {
        *why = "data after the JSON object";
        return -1;
    }
    return 0;
refused:
    *why = s.why;
    return -1;
}

/* ------------------------------------------------------------------ the daemon connection */

struct conn {
    int fd;
    unsigned char in[65536];
    size_t head, tail;                   /* unread bytes: in[head..tail) */
};

/* Send the ``n`` pieces of ``iov`` (modified) whole; -1 with errno (ETIMEDOUT on the
 * socket's send timeout). */
static int send_iov(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                errno = ETIMEDOUT;
            return -1;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) {
            w -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + w;
            iov->iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* More bytes into the connection's buffer: >0, 0 at EOF, -1 with errno. */
static ssize_t conn_fill(struct conn *c)
{
    if (c->head == c->tail)
        c->head = c->tail = 0;
    for (;;) {
        ssize_t r = recv(c->fd, c->in + c->tail, sizeof c->in - c->tail, 0);
        if (r >= 0) {
            c->tail += (size_t)r;
            return r;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            errno = ETIMEDOUT;
        return -1;
    }
}

/* Exactly ``n`` bytes into ``dst``; -1 with ``*why`` set on EOF or an error. */
static int conn_read(struct conn *c, void *dst, size_t n, const char **why)
{
    unsigned char *d = dst;
    while (n > 0) {
        if (c->head == c->tail) {
            ssize_t r = conn_fill(c);
            if (r == 0) {
                *why = "connection closed by vswitchd";
                return -1;
            }
            if (r < 0) {
                *why = strerror(errno);
                return -1;
            }
        }
        size_t take = c->tail - c->head < n ? c->tail - c->head : n;
        memcpy(d, c->in + c->head, take);
        c->head += take;
        d += take;
        n -= take;
    }
    return 0;
}

static int set_timeouts(int fd, int recv_s, int send_s)
{
    struct timeval r = {.tv_sec = recv_s}, w = {.tv_sec = send_s};
    return setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &r, sizeof r) < 0
        || setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &w, sizeof w) < 0 ? -1 : 0;
}

/* Connect to ``path``, send the hello line and read the answer: 0 when it is HELLO_OK
 * (``c`` is then ready for frames), -1 when the invocation must fall back. */
static int hello(struct conn *c, const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t plen = strlen(path);
    if (plen == 0 || plen >= sizeof a.sun_path)
        return -1;
    memcpy(a.sun_path, path, plen);
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        return -1;
    c->head = c->tail = 0;
    /* SO_SNDTIMEO bounds connect too (a full listen backlog) */
    if (set_timeouts(c->fd, HELLO_TIMEOUT_S, HELLO_TIMEOUT_S) < 0)
        goto fail;
    for (;;) {
        if (connect(c->fd, (struct sockaddr *)&a, sizeof a) == 0)
            break;
        if (errno != EINTR)
            goto fail;
    }
    struct iovec iov = {.iov_base = HELLO, .iov_len = sizeof HELLO - 1};
    if (send_iov(c->fd, &iov, 1) < 0)
        goto fail;
    for (size_t scanned = 0;;) {
        for (; scanned < c->tail; scanned++) {
            if (c->in[scanned] == '\n') {
                int ok = scanned == sizeof HELLO_OK - 1 && memcmp(c->in, HELLO_OK, scanned) == 0;
                if (!ok)
                    goto fail;
                c->head = scanned + 1;
                return 0;
            }
        }
        if (c->tail >= MAX_HELLO_LINE || conn_fill(c) <= 0)
            goto fail;
    }
fail:
    close(c->fd);
    c->fd = -1;
    return -1;
}

/* ------------------------------------------------------------------ running an executable */

/* Close every fd from ``lowfd`` up: close_range, else the entries of /proc/self/fd, else
 * every number below RLIMIT_NOFILE. Runs in the child between fork and exec. */
static void close_from(int lowfd)
{
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)lowfd, ~0u, 0u) == 0)
        return;
#endif
    DIR *d = opendir("/proc/self/fd");
    if (d != NULL) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            char *endp;
            long fd = strtol(e->d_name, &endp, 10);
            if (*endp == '\0' && endp != e->d_name && fd >= lowfd && fd != dirfd(d))
                close((int)fd);
        }
        closedir(d);
        return;
    }
    struct rlimit rl;
    long max = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY
        && rl.rlim_cur < 1048576 ? (long)rl.rlim_cur : 1048576;
    for (long fd = lowfd; fd < max; fd++)
        close((int)fd);
}

/* The child of run_child: pipes on 0/1/2, the exec error pipe on 3 (close-on-exec),
 * nothing else; default signal dispositions, empty mask; exec. On a failure its errno
 * goes to fd 3 and the child exits 127. */
static void child_exec(const char *path, char **envp, int in_r, int out_w, int err_w, int errp_w)
    __attribute__((noreturn));
static void child_exec(const char *path, char **envp, int in_r, int out_w, int err_w, int errp_w)
{
    /* every fd here is >= 3 (main opened 0, 1 and 2), so the dup2s do not overlap them */
    if (dup2(in_r, 0) < 0 || dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0)
        goto fail;
    if (errp_w != 3 && dup3(errp_w, 3, O_CLOEXEC) < 0)
        goto fail;
    close_from(4);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            sigaction(sig, &dfl, NULL);          /* EINVAL for libc's reserved signals: fine */
    sigset_t none;
    sigemptyset(&none);
    if (sigprocmask(SIG_SETMASK, &none, NULL) < 0)
        goto fail;
    char *argv[] = {(char *)path, NULL};
    execve(path, argv, envp);
fail:;
    int e = errno;
    (void)write(3, &e, sizeof e);
    _exit(127);
}

struct run_result {
    int32_t status;                      /* exit code, -signal, or -1000-errno */
    struct buf out, err;
};

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ? -1 : 0;
}

/* Read what ``fd`` has into ``b`` (at most MAX_OUTPUT in all, the first bytes kept): 1
 * while open, 0 at EOF, -1 when the cap is passed, -2 on an error. */
static int drain(int fd, struct buf *b)
{
    for (;;) {
        unsigned char chunk[65536];
        ssize_t r = read(fd, chunk, sizeof chunk);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? 1 : -2;
        if (r == 0)
            return 0;
        size_t keep = (size_t)r < MAX_OUTPUT - b->len ? (size_t)r : MAX_OUTPUT - b->len;
        if (buf_append(b, chunk, keep, MAX_OUTPUT) < 0)
            return -2;
        if (keep < (size_t)r)
            return -1;
    }
}

/* Run ``path`` with ``envp`` and ``in`` on its stdin; ``res`` gets its status and
 * outputs. Returns -1 (errno) only when the client itself fails (no pipe, no fork). */
static int run_child(const char *path, char **envp, const unsigned char *in, size_t in_len,
                     struct run_result *res)
{
    int pin[2], pout[2], perr[2], perrno[2];
    if (pipe2(pin, O_CLOEXEC) < 0)
        return -1;
    if (pipe2(pout, O_CLOEXEC) < 0)
        goto close_in;
    if (pipe2(perr, O_CLOEXEC) < 0)
        goto close_out;
    if (pipe2(perrno, O_CLOEXEC) < 0)
        goto close_err;
    /* the parent's ends only (O_NONBLOCK belongs to the open file, not shared with the child's) */
    if (set_nonblock(pin[1]) < 0 || set_nonblock(pout[0]) < 0 || set_nonblock(perr[0]) < 0)
        goto close_errno;
    pid_t pid = fork();
    if (pid < 0)
        goto close_errno;
    if (pid == 0)
        child_exec(path, envp, pin[0], pout[1], perr[1], perrno[1]);
    close(pin[0]);
    close(pout[1]);
    close(perr[1]);
    close(perrno[1]);
    int child_errno = 0;
    ssize_t got;
    do
        got = read(perrno[0], &child_errno, sizeof child_errno);
    while (got < 0 && errno == EINTR);
    close(perrno[0]);
    int fds[3] = {pin[1], pout[0], perr[0]};   /* -1 once closed */
    if (got == (ssize_t)sizeof child_errno) {  /* exec failed: the child exits at once */
        for (int i = 0; i < 3; i++)
            close(fds[i]);
        fds[0] = fds[1] = fds[2] = -1;
    } else {
        child_errno = 0;
    }
    size_t written = 0;
    if (fds[0] >= 0 && in_len == 0) {
        close(fds[0]);
        fds[0] = -1;
    }
    while (fds[0] >= 0 || fds[1] >= 0 || fds[2] >= 0) {
        struct pollfd p[3];
        for (int i = 0; i < 3; i++) {
            p[i].fd = fds[i];
            p[i].events = i == 0 ? POLLOUT : POLLIN;
            p[i].revents = 0;
        }
        if (poll(p, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            kill(pid, SIGKILL);              /* cannot wait for it: stop it, keep what came */
            break;
        }
        if (fds[0] >= 0 && p[0].revents) {
            ssize_t w = write(fds[0], in + written, in_len - written);
            if (w > 0)
                written += (size_t)w;
            if ((w < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)
                || written == in_len) {      /* done, or EPIPE: the child stopped reading */
                close(fds[0]);
                fds[0] = -1;
            }
        }
        for (int i = 1; i < 3; i++) {
            if (fds[i] < 0 || !p[i].revents)
                continue;
            int r = drain(fds[i], i == 1 ? &res->out : &res->err);
            if (r == 1)
                continue;
            if (r < 0)                       /* over MAX_OUTPUT, or no memory */
                kill(pid, SIGKILL);
            close(fds[i]);
            fds[i] = -1;
        }
    }
    for (int i = 0; i < 3; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    int ws;
    while (waitpid(pid, &ws, 0) < 0) {
        if (errno != EINTR) {
            res->status = -START_FAILED - errno;
            return 0;
        }
    }
    if (child_errno)
        res->status = -START_FAILED - child_errno;
    else if (WIFEXITED(ws))
        res->status = WEXITSTATUS(ws);
    else
        res->status = -WTERMSIG(ws);
    return 0;
close_errno:
    close(perrno[0]);
    close(perrno[1]);
close_err:
    close(perr[0]);
    close(perr[1]);
close_out:
    close(pout[0]);
    close(pout[1]);
close_in:
    close(pin[0]);
    close(pin[1]);
    return -1;
}

/* The first "dir/name" of the colon-separated ``dirs`` that is a regular file we may
 * execute, into ``path``; 0, or an errno (ENOENT when none is). Empty entries are
 * skipped (they would mean the current directory). */
static int find_in_dirs(const char *name, const char *dirs, char *path, size_t pathsz)
{
    size_t nlen = strlen(name);
    for (const char *d = dirs; *d;) {
        const char *colon = strchr(d, ':');
        size_t dlen = colon ? (size_t)(colon - d) : strlen(d);
        if (dlen > 0 && dlen + 1 + nlen < pathsz) {
            memcpy(path, d, dlen);
            path[dlen] = '/';
            memcpy(path + dlen + 1, name, nlen + 1);
            struct stat st;
            if (stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0)
                return 0;
        }
        if (!colon)
            break;
        d = colon + 1;
    }
    return ENOENT;
}

/* Serve one 'R' frame (``p``, ``len`` bytes, NUL-terminated at p[len]) and answer 'D'. */
static void serve_run(struct conn *c, unsigned char *p, size_t len)
{
    unsigned char *end = p + len;
    char *name = (char *)p;
    unsigned char *nul = memchr(p, '\0', len);
    if (nul == NULL)
        lost("protocol error: R frame without the name's NUL");
    char *dirs = (char *)nul + 1;
    nul = memchr(nul + 1, '\0', (size_t)(end - (nul + 1)));
    if (nul == NULL)
        lost("protocol error: R frame without the directories' NUL");
    unsigned char *q = nul + 1;
    size_t nenv = 0;
    for (;;) {                               /* count the env entries up to the empty one */
        nul = memchr(q, '\0', (size_t)(end - q));
        if (nul == NULL)
            lost("protocol error: R frame without the empty entry ending the environment");
        if (nul == q)
            break;
        nenv++;
        q = nul + 1;
    }
    unsigned char *in = q + 1;
    size_t in_len = (size_t)(end - in);

    struct run_result res = {.status = 0};
    char path[PATH_MAX];
    char **envp = NULL;
    if (name[0] == '\0' || strchr(name, '/') != NULL)
        res.status = -START_FAILED - EINVAL;
    else if (nenv > MAX_CHILD_ENV)
        res.status = -START_FAILED - E2BIG;
    else if (find_in_dirs(name, dirs, path, sizeof path) != 0)
        res.status = -START_FAILED - ENOENT;
    else if ((envp = calloc(nenv + 1, sizeof *envp)) == NULL)
        res.status = -START_FAILED - ENOMEM;
    else {
        q = (unsigned char *)dirs + strlen(dirs) + 1;     /* the first env entry */
        for (size_t i = 0; i < nenv; i++) {
            envp[i] = (char *)q;
            q += strlen((char *)q) + 1;
        }
        if (run_child(path, envp, in, in_len, &res) < 0)
            res.status = -START_FAILED - errno;
    }
    free(envp);

    size_t err_len = res.err.len;
    if (err_len > MAX_PAYLOAD - 8 - res.out.len)
        err_len = MAX_PAYLOAD - 8 - res.out.len;
    unsigned char head[5 + 8];
    head[0] = 'D';
    put_be32(head + 1, (uint32_t)(8 + res.out.len + err_len));
    put_be32(head + 5, (uint32_t)res.status);
    put_be32(head + 9, (uint32_t)res.out.len);
    struct iovec iov[3] = {{head, sizeof head}, {res.out.data, res.out.len}, {res.err.data, err_len}};
    int sent = send_iov(c->fd, iov, 3);
    int e = errno;
    free(res.out.data);
    free(res.err.data);
    if (sent < 0) {
        char why[256];
        snprintf(why, sizeof why, "sending frame D: %s", strerror(e));
        lost(why);
    }
}

/* After the hello: send 'I', then serve frames until 'X' (exit) or a lost daemon (exit).
 * Returns only when 'I' was not sent whole: the daemon has nothing to act on, the caller
 * falls back. */
static void session(struct conn *c, const struct buf *in)
{
    struct buf frame = {0};
    const char *why;
    char reason[256];
    unsigned char head[5];
    struct buf env = {0};
    int too_big = 0;
    for (char **e = environ; *e && !too_big; e++)    /* entries without '=' are no variables */
        too_big = strchr(*e, '=') != NULL && buf_append(&env, *e, strlen(*e) + 1, MAX_PAYLOAD) < 0;
    /* too big for a frame (or no memory): nothing is sent, the daemon drops the session */
    if (too_big || buf_append(&env, "", 1, MAX_PAYLOAD) < 0 || env.len > MAX_PAYLOAD - in->len) {
        free(env.data);
        return;
    }
    head[0] = 'I';
    put_be32(head + 1, (uint32_t)(env.len + in->len));
    struct iovec iov[3] = {{head, 5}, {env.data, env.len}, {in->data, in->len}};
    if (set_timeouts(c->fd, 0, FRAME_SEND_TIMEOUT_S) < 0 || send_iov(c->fd, iov, 3) < 0) {
        free(env.data);
        return;                                   /* 'I' not whole: the daemon does nothing */
    }
    free(env.data);
    for (;;) {
        if (conn_read(c, head, 5, &why) < 0)
            lost(why);
        uint32_t len = get_be32(head + 1);
        if (len > MAX_PAYLOAD) {
            snprintf(reason, sizeof reason, "protocol error: frame '%c' of %u bytes announced (at most %u)",
                     head[0] >= 0x20 && head[0] < 0x7f ? head[0] : '?', len, MAX_PAYLOAD);
            lost(reason);
        }
        if (head[0] != 'R' && head[0] != 'O' && head[0] != 'E' && head[0] != 'X') {
            snprintf(reason, sizeof reason, "protocol error: unknown frame type 0x%02x", head[0]);
            lost(reason);
        }
        frame.len = 0;
        if (buf_reserve(&frame, (size_t)len + 1, MAX_PAYLOAD + 1) < 0)
            lost("no memory for a frame");
        if (conn_read(c, frame.data, len, &why) < 0) {
            snprintf(reason, sizeof reason, "in the middle of frame '%c' of %u bytes: %s", head[0], len, why);
            lost(reason);
        }
        frame.data[len] = '\0';
        switch (head[0]) {
        case 'R':
            serve_run(c, frame.data, len);
            break;
        case 'O':
        case 'E':
            (void)write_all(head[0] == 'O' ? 1 : 2, frame.data, len);  /* a closed fd 1/2: nothing to do */
            break;
        case 'X':
            if (len != 4) {
                snprintf(reason, sizeof reason, "protocol error: X frame of %u bytes (4 expected)", len);
                lost(reason);
            }
            exit((int)(int32_t)get_be32(frame.data));
        }
    }
}

/* ------------------------------------------------------------------ main */

/* fds 0, 1 and 2 open (on /dev/null when the runtime closed them), so that no fd this
 * client opens takes their number. */
static void open_std_fds(void)
{
    for (int fd = 0; fd < 3; fd++) {
        if (fcntl(fd, F_GETFD) >= 0 || errno != EBADF)
            continue;
        int n = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
        if (n < 0)
            exit(1);
        if (n != fd) {
            dup2(n, fd);
            close(n);
        }
    }
}

static int scan_mode(void)
{
    struct buf in = {0};
    unsigned char extra;
    size_t extra_len;
    struct found f;
    const char *why;
    char line[512];
    int n;
    int r = read_to_end(0, &in, MAX_PAYLOAD, &extra, &extra_len);
    if (r != 0)
        n = snprintf(line, sizeof line, "fallback %s\n", r > 0 ? "stdin is too long" : strerror(errno));
    else if (scan_document(in.data ? in.data : (const unsigned char *)"", in.len, &f, &why) < 0)
        n = snprintf(line, sizeof line, "fallback %s\n", why);
    else
        n = snprintf(line, sizeof line, "socket %s\n%s%s%s", f.has_socket ? f.socket : VSWITCH_DEFAULT_SOCKET,
                     f.has_version ? "cniVersion " : "", f.has_version ? f.version : "",
                     f.has_version ? "\n" : "");
    free(in.data);
    return write_all(1, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1) < 0;
}

int main(int argc, char **argv)
{
    open_std_fds();
    struct sigaction ign = {.sa_handler = SIG_IGN}, dfl = {.sa_handler = SIG_DFL};
    sigaction(SIGPIPE, &ign, &saved_sigpipe);
    sigaction(SIGCHLD, &dfl, &saved_sigchld);   /* an inherited SIG_IGN would reap our children */
    const char *cmd = getenv("CNI_COMMAND");
    if (cmd != NULL)
        cni_command = cmd;

    if (argc == 2 && strcmp(argv[1], "--scan") == 0)
        return scan_mode();
    if (argc > 1 || cni_command[0] == '\0')
        fallback(argv, NULL, NULL, 0, 0);
    if (strcmp(cni_command, "VERSION") == 0) {
        static const char version[] = VSWITCH_VERSION_JSON;
        return write_all(1, version, sizeof version - 1) < 0;
    }

    struct buf in = {0};
    unsigned char extra;
    size_t extra_len;
    int r = read_to_end(0, &in, MAX_PAYLOAD, &extra, &extra_len);
    if (r != 0)                                   /* too long (the rest is streamed), or an error */
        fallback(argv, &in, &extra, extra_len, r > 0);
    struct found f;
    const char *why;
    if (scan_document(in.data ? in.data : (const unsigned char *)"", in.len, &f, &why) < 0)
        fallback(argv, &in, NULL, 0, 0);
    if (f.has_version)
        memcpy(cni_version, f.version, sizeof cni_version);
    struct conn *c = malloc(sizeof *c);
    if (c == NULL || hello(c, f.has_socket ? f.socket : VSWITCH_DEFAULT_SOCKET) < 0)
        fallback(argv, &in, NULL, 0, 0);
    session(c, &in);
    close(c->fd);                                 /* 'I' was not sent: nothing happened */
    fallback(argv, &in, NULL, 0, 0);
}
