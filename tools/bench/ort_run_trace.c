/* ort_run_trace: a stand-in libonnxruntime that times every OrtApi::Run call of the process loading it.
 *
 * The server loads ONNX Runtime with dlopen (`--ort-lib` / ORT_DYLIB_PATH) and takes every entry point from
 * the table that OrtGetApiBase()->GetApi() returns. Pointing ORT_DYLIB_PATH at this library gives it a copy of
 * the real table (ORT_TRACE_REAL_LIB) with Run replaced by a wrapper that appends one line per call to
 * ORT_TRACE_FILE:
 *
 *     <session pointer> <number of inputs> <start ns> <end ns>      (CLOCK_MONOTONIC)
 *
 * with a single write(2) per line (O_APPEND, so lines never interleave). Everything else is the real library:
 * the bench driver uses it to split each decode step into time inside Session::run and time outside it.
 *
 *   cc -O2 -shared -fPIC -o ort_run_trace.so ort_run_trace.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* OrtApi entries ort 2.0.0-rc.15 knows with feature api-31 (ort-sys OrtApi: 428 function pointers). Run is
 * entry 9 in every API version (CreateStatus .. CreateSessionFromArray come first). */
#define API_ENTRIES 428
#define RUN_INDEX 9

typedef struct {
    const void *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

typedef void *(*RunFn)(void *session, const void *run_options, const char *const *input_names,
                       const void *const *inputs, size_t input_len, const char *const *output_names,
                       size_t output_names_len, void **outputs);

static const OrtApiBase *real_base;
static OrtApiBase traced_base;
static void *table[API_ENTRIES];
static RunFn real_run;
static int trace_fd = -1;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *traced_run(void *session, const void *run_options, const char *const *input_names,
                        const void *const *inputs, size_t input_len, const char *const *output_names,
                        size_t output_names_len, void **outputs) {
    uint64_t t0 = now_ns();
    void *status = real_run(session, run_options, input_names, inputs, input_len, output_names,
                            output_names_len, outputs);
    uint64_t t1 = now_ns();
    if (trace_fd >= 0) {
        char line[96];
        int n = snprintf(line, sizeof line, "%p %zu %llu %llu\n", session, input_len, (unsigned long long)t0,
                         (unsigned long long)t1);
        if (write(trace_fd, line, (size_t)n) < 0) { /* tracing is best effort */ }
    }
    return status;
}

static const void *traced_get_api(uint32_t version) {
    const void *const *api = (const void *const *)real_base->GetApi(version);
    if (api == NULL) return NULL;
    memcpy(table, api, sizeof table);
    real_run = (RunFn)table[RUN_INDEX];
    table[RUN_INDEX] = (void *)traced_run;
    return table;
}

static const char *traced_version(void) { return real_base->GetVersionString(); }

const OrtApiBase *OrtGetApiBase(void) {
    if (real_base != NULL) return &traced_base;
    const char *real = getenv("ORT_TRACE_REAL_LIB");
    if (real == NULL) {
        fprintf(stderr, "ort_run_trace: set ORT_TRACE_REAL_LIB to the real libonnxruntime.so\n");
        return NULL;
    }
    void *lib = dlopen(real, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "ort_run_trace: %s\n", dlerror());
        return NULL;
    }
    const OrtApiBase *(*get)(void) = (const OrtApiBase *(*)(void))dlsym(lib, "OrtGetApiBase");
    if (get == NULL) return NULL;
    real_base = get();
    const char *path = getenv("ORT_TRACE_FILE");
    if (path != NULL) trace_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    traced_base.GetApi = traced_get_api;
    traced_base.GetVersionString = traced_version;
    return &traced_base;
}
