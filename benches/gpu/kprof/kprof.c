// kprof: a per-kernel GPU profile of any CUDA process, through CUPTI's activity API, for the GPU
// host (which has no nsys). Loaded with LD_PRELOAD; records every kernel, memcpy and memset with
// its device timestamps, and at exit writes a table to $KPROF_OUT (default stderr): per kernel name
// the count, total and mean time, sorted by total, plus the window's wall span, the sum of kernel
// time and the GPU's busy time (the union of the intervals), so "launch-bound" shows as busy << span.
//
// Window: when the program calls cuProfilerStart/cuProfilerStop (driver) or cudaProfilerStart/Stop
// (runtime; torch.cuda.profiler.start/stop), only activity inside [start, stop] counts, and
// KPROF_STEPS=N divides the counts by N (launches per step). Without such calls, the whole run.
//
// Build (here): benches/gpu/kprof/build.sh. Run (GPU host):
//   LD_PRELOAD=$PWD/kprof.so LD_LIBRARY_PATH=$DIR_OF_LIBCUPTI KPROF_OUT=prof.txt KPROF_STEPS=10 cmd…
#include <cupti.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BUF_SIZE (16u << 20)

typedef struct {
  char *name;
  uint64_t count;
  uint64_t total_ns;
} Entry;

typedef struct {
  uint64_t start, end;
  const char *name;  // the entry's name (strdup'd, stable while the window lasts)
} Interval;

typedef struct {
  const char *before, *after;
  uint64_t count, total_ns;
} Gap;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static Entry *entries;
static size_t n_entries, cap_entries;
static Interval *intervals;
static size_t n_intervals, cap_intervals;
static uint64_t window_start, window_stop;
static int window_seen;

static void report(void);

static void add(const char *name, uint64_t start, uint64_t end) {
  // Records are buffered and may complete after the stop; filter on the recorded window.
  if (window_seen && (start < window_start || (window_stop && end > window_stop))) return;
  pthread_mutex_lock(&lock);
  size_t i;
  for (i = 0; i < n_entries; i++)
    if (strcmp(entries[i].name, name) == 0) break;
  if (i == n_entries) {
    if (n_entries == cap_entries) {
      cap_entries = cap_entries ? 2 * cap_entries : 256;
      entries = realloc(entries, cap_entries * sizeof(Entry));
    }
    entries[i].name = strdup(name);
    entries[i].count = 0;
    entries[i].total_ns = 0;
    n_entries++;
  }
  entries[i].count++;
  entries[i].total_ns += end - start;
  const char *interned = entries[i].name;
  if (n_intervals == cap_intervals) {
    cap_intervals = cap_intervals ? 2 * cap_intervals : 65536;
    intervals = realloc(intervals, cap_intervals * sizeof(Interval));
  }
  intervals[n_intervals].start = start;
  intervals[n_intervals].end = end;
  intervals[n_intervals].name = interned;
  n_intervals++;
  pthread_mutex_unlock(&lock);
}

static void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *max_records) {
  *buffer = aligned_alloc(8, BUF_SIZE);
  *size = BUF_SIZE;
  *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size,
                               size_t valid) {
  (void)ctx;
  (void)stream;
  (void)size;
  CUpti_Activity *record = NULL;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    switch (record->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)record;
        add(k->name, k->start, k->end);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)record;
        char name[64];
        snprintf(name, sizeof name, "[memcpy kind %u]", (unsigned)m->copyKind);
        add(name, m->start, m->end);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)record;
        add("[memset]", m->start, m->end);
        break;
      }
      default:
        break;
    }
  }
  free(buffer);
}

static void CUPTIAPI callback(void *data, CUpti_CallbackDomain domain, CUpti_CallbackId id,
                              const void *info) {
  (void)data;
  const CUpti_CallbackData *cb = (const CUpti_CallbackData *)info;
  int start = (domain == CUPTI_CB_DOMAIN_DRIVER_API && id == CUPTI_DRIVER_TRACE_CBID_cuProfilerStart) ||
              (domain == CUPTI_CB_DOMAIN_RUNTIME_API &&
               id == CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000);
  int stop = (domain == CUPTI_CB_DOMAIN_DRIVER_API && id == CUPTI_DRIVER_TRACE_CBID_cuProfilerStop) ||
             (domain == CUPTI_CB_DOMAIN_RUNTIME_API &&
              id == CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStop_v4000);
  uint64_t now;
  cuptiGetTimestamp(&now);
  // The window opens at the exit of the start call and closes at the entry of the stop call.
  if (start && cb->callbackSite == CUPTI_API_EXIT) {
    pthread_mutex_lock(&lock);
    // Activity recorded before the window is dropped.
    for (size_t i = 0; i < n_entries; i++) free(entries[i].name);
    n_entries = 0;
    n_intervals = 0;
    window_start = now;
    window_stop = 0;
    window_seen = 1;
    pthread_mutex_unlock(&lock);
  }
  if (stop && cb->callbackSite == CUPTI_API_ENTER) {
    window_stop = now;
    report();  // at the stop, while the context is alive (at exit it may be gone)
  }
}

static int by_total(const void *a, const void *b) {
  const Entry *x = a, *y = b;
  return x->total_ns < y->total_ns ? 1 : x->total_ns > y->total_ns ? -1 : 0;
}

static int by_gap(const void *a, const void *b) {
  const Gap *x = a, *y = b;
  return x->total_ns < y->total_ns ? 1 : x->total_ns > y->total_ns ? -1 : 0;
}

static int by_start(const void *a, const void *b) {
  const Interval *x = a, *y = b;
  return x->start < y->start ? -1 : x->start > y->start ? 1 : 0;
}

static void report(void) {
  cuptiActivityFlushAll(1);
  pthread_mutex_lock(&lock);
  const char *path = getenv("KPROF_OUT");
  char expanded[4096];
  if (path) {
    // "%p" in the path becomes the process id (one file per process of a multi-process run).
    const char *mark = strstr(path, "%p");
    if (mark) {
      snprintf(expanded, sizeof expanded, "%.*s%d%s", (int)(mark - path), path, (int)getpid(),
               mark + 2);
      path = expanded;
    }
  }
  FILE *out = path ? fopen(path, "w") : stderr;
  if (!out) out = stderr;
  const char *steps_env = getenv("KPROF_STEPS");
  double steps = steps_env ? atof(steps_env) : 1.0;
  if (steps <= 0) steps = 1.0;
  qsort(entries, n_entries, sizeof(Entry), by_total);
  qsort(intervals, n_intervals, sizeof(Interval), by_start);
  uint64_t sum = 0, launches = 0, busy = 0, first = UINT64_MAX, last = 0, cur_s = 0, cur_e = 0;
  // Idle time between busy stretches, by the kernel that ended before it and the one after it,
  // and a histogram of gap lengths: where the GPU waits on the host.
  static const uint64_t bounds[] = {2000, 10000, 50000, 200000, 1000000, UINT64_MAX};
  static const char *labels[] = {"< 2 us", "2-10 us", "10-50 us", "50-200 us", "0.2-1 ms", "> 1 ms"};
  uint64_t bucket_ns[6] = {0}, bucket_n[6] = {0};
  Gap *gaps = NULL;
  size_t n_gaps = 0, cap_gaps = 0;
  const char *cur_name = NULL;
  for (size_t i = 0; i < n_entries; i++) {
    sum += entries[i].total_ns;
    launches += entries[i].count;
  }
  for (size_t i = 0; i < n_intervals; i++) {
    Interval v = intervals[i];
    if (v.start < first) first = v.start;
    if (v.end > last) last = v.end;
    if (i == 0 || v.start > cur_e) {
      if (i > 0) {
        uint64_t gap = v.start - cur_e;
        int b = 0;
        while (gap >= bounds[b]) b++;
        bucket_ns[b] += gap;
        bucket_n[b]++;
        size_t g;
        for (g = 0; g < n_gaps; g++)
          if (gaps[g].before == cur_name && gaps[g].after == v.name) break;
        if (g == n_gaps) {
          if (n_gaps == cap_gaps) {
            cap_gaps = cap_gaps ? 2 * cap_gaps : 256;
            gaps = realloc(gaps, cap_gaps * sizeof(Gap));
          }
          gaps[g] = (Gap){cur_name, v.name, 0, 0};
          n_gaps++;
        }
        gaps[g].count++;
        gaps[g].total_ns += gap;
      }
      busy += cur_e - cur_s;
      cur_s = v.start;
      cur_e = v.end;
      cur_name = v.name;
    } else if (v.end > cur_e) {
      cur_e = v.end;
      cur_name = v.name;
    }
  }
  busy += cur_e - cur_s;
  uint64_t span = window_seen && window_stop ? window_stop - window_start : (last > first ? last - first : 0);
  fprintf(out, "kprof: window %s; per step = totals / %.0f\n",
          window_seen ? "cuProfilerStart..Stop" : "whole run", steps);
  fprintf(out, "kprof: span %.3f ms/step, kernel sum %.3f ms/step, GPU busy %.3f ms/step (%.1f%% of span), "
          "%.1f launches/step, %zu distinct\n",
          span / 1e6 / steps, sum / 1e6 / steps, busy / 1e6 / steps, span ? 100.0 * busy / span : 0.0,
          launches / steps, n_entries);
  fprintf(out, "%10s %8s %9s %6s  %s\n", "ms/step", "n/step", "us/call", "%", "kernel");
  for (size_t i = 0; i < n_entries; i++) {
    Entry *e = &entries[i];
    fprintf(out, "%10.3f %8.1f %9.2f %6.2f  %.200s\n", e->total_ns / 1e6 / steps, e->count / steps,
            e->total_ns / 1e3 / (double)e->count, sum ? 100.0 * e->total_ns / sum : 0.0, e->name);
  }
  fprintf(out, "\nkprof: idle gaps per step by length\n");
  for (int b = 0; b < 6; b++)
    fprintf(out, "%10.3f ms %8.1f gaps  %s\n", bucket_ns[b] / 1e6 / steps, bucket_n[b] / steps, labels[b]);
  qsort(gaps, n_gaps, sizeof(Gap), by_gap);
  fprintf(out, "kprof: idle gaps per step by the kernels around them (top 40)\n");
  fprintf(out, "%10s %8s %9s  %s\n", "ms/step", "n/step", "us/gap", "before -> after");
  for (size_t g = 0; g < n_gaps && g < 40; g++)
    fprintf(out, "%10.3f %8.1f %9.2f  %.90s -> %.90s\n", gaps[g].total_ns / 1e6 / steps,
            gaps[g].count / steps, gaps[g].total_ns / 1e3 / (double)gaps[g].count, gaps[g].before,
            gaps[g].after);
  free(gaps);
  if (out != stderr) fclose(out);
  pthread_mutex_unlock(&lock);
}

static void report_at_exit(void) {
  if (!window_seen && n_entries > 0) report();
}

__attribute__((constructor)) static void kprof_init(void) {
  if (cuptiActivityRegisterCallbacks(requested, completed) != CUPTI_SUCCESS) {
    fprintf(stderr, "kprof: CUPTI did not register (no profile)\n");
    return;
  }
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  CUpti_SubscriberHandle subscriber;
  if (cuptiSubscribe(&subscriber, (CUpti_CallbackFunc)callback, NULL) == CUPTI_SUCCESS) {
    cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStart);
    cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_DRIVER_API, CUPTI_DRIVER_TRACE_CBID_cuProfilerStop);
    cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API,
                        CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStart_v4000);
    cuptiEnableCallback(1, subscriber, CUPTI_CB_DOMAIN_RUNTIME_API,
                        CUPTI_RUNTIME_TRACE_CBID_cudaProfilerStop_v4000);
  }
  atexit(report_at_exit);
}
