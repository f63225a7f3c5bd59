// SPDX-License-Identifier: EUPL-1.2
// GPU time per kernel name of any CUDA process, through CUPTI's activity API, for profiling our
// binaries on a machine without Nsight. Built as a CUDA injection library:
//
//   gcc -O2 -shared -fPIC cupti_kernels.c -o libcupti_kernels.so -l:libcupti.so.12
//       -I$CUPTI/include -I$CUDART/include -I$NVCC/include -L$CUPTI/lib     (one line)
//
//   export CUDA_INJECTION64_PATH=$PWD/libcupti_kernels.so LD_LIBRARY_PATH=$CUPTI/lib:$LD_LIBRARY_PATH
//   CUPTI_KERNELS_SKIP_MS=5000 ./some-cuda-program ...
//
// ($CUPTI, $CUDART: the nvidia/cuda_cupti and nvidia/cuda_runtime directories of PyPI's
// nvidia-cuda-cupti-cu12 and nvidia-cuda-runtime-cu12 wheels, $NVCC nvidia/cuda_nvcc of
// nvidia-cuda-nvcc-cu12's for crt/host_defines.h.) At exit it
// prints, per kernel name, the calls and the total and mean GPU time, largest first,
// with the span from the first to the last kernel counted and the GPU's busy time in it.
// CUPTI_KERNELS_SKIP_MS=N leaves out the kernels that start in the first N ms after CUDA starts
// (model loading, compilation, prefill); CUPTI_KERNELS_TOP=N prints N names (default 40);
// CUPTI_KERNELS_OUT=FILE appends the report to FILE instead.

#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUF_SIZE (8u << 20)
#define MAX_NAMES 4096

typedef struct {
  char* name;
  uint64_t calls;
  uint64_t total_ns;
} Entry;

static Entry entries[MAX_NAMES];
static int n_entries;
static uint64_t counted_from, span_start, span_end, busy_ns;
static uint64_t last_end_seen;

static void add(const char* name, uint64_t start, uint64_t end) {
  if (start < counted_from) return;
  if (span_start == 0 || start < span_start) span_start = start;
  if (end > span_end) span_end = end;
  // Busy time, approximately: records arrive about in order; overlap is counted once.
  uint64_t from = start > last_end_seen ? start : last_end_seen;
  if (end > from) busy_ns += end - from;
  if (end > last_end_seen) last_end_seen = end;
  for (int i = 0; i < n_entries; i++) {
    if (strcmp(entries[i].name, name) == 0) {
      entries[i].calls++;
      entries[i].total_ns += end - start;
      return;
    }
  }
  if (n_entries < MAX_NAMES) {
    entries[n_entries].name = strdup(name ? name : "?");
    entries[n_entries].calls = 1;
    entries[n_entries].total_ns = end - start;
    n_entries++;
  }
}

static void CUPTIAPI requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = (uint8_t*)aligned_alloc(8, BUF_SIZE);
  *size = *buffer ? BUF_SIZE : 0;
  *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t size, size_t valid) {
  (void)ctx;
  (void)stream;
  (void)size;
  CUpti_Activity* record = NULL;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || record->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      // start, end and name sit at the same offsets in every version of the kernel record.
      const CUpti_ActivityKernel4* k = (const CUpti_ActivityKernel4*)record;
      add(k->name, k->start, k->end);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const CUpti_ActivityMemcpy* m = (const CUpti_ActivityMemcpy*)record;
      add("[memcpy]", m->start, m->end);
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const CUpti_ActivityMemset* m = (const CUpti_ActivityMemset*)record;
      add("[memset]", m->start, m->end);
    }
  }
  free(buffer);
}

static int by_total(const void* a, const void* b) {
  const Entry* x = (const Entry*)a;
  const Entry* y = (const Entry*)b;
  return x->total_ns < y->total_ns ? 1 : x->total_ns > y->total_ns ? -1 : 0;
}

static void report(void) {
  cuptiActivityFlushAll(1);
  const char* path = getenv("CUPTI_KERNELS_OUT");
  FILE* out = path ? fopen(path, "a") : NULL;
  if (out == NULL) out = stderr;
  qsort(entries, n_entries, sizeof(Entry), by_total);
  const char* top_env = getenv("CUPTI_KERNELS_TOP");
  int top = top_env ? atoi(top_env) : 40;
  uint64_t total = 0, calls = 0;
  for (int i = 0; i < n_entries; i++) {
    total += entries[i].total_ns;
    calls += entries[i].calls;
  }
  double span_ms = span_end > span_start ? (span_end - span_start) / 1e6 : 0.0;
  fprintf(out, "\n[cupti] %llu kernels, %.3f ms of GPU time in a span of %.3f ms (busy %.1f%%)\n",
          (unsigned long long)calls, total / 1e6, span_ms, span_ms > 0 ? 100.0 * busy_ns / 1e6 / span_ms : 0.0);
  fprintf(out, "[cupti] %8s %10s %9s %6s  %s\n", "calls", "total ms", "mean us", "share", "kernel");
  for (int i = 0; i < n_entries && i < top; i++) {
    fprintf(out, "[cupti] %8llu %10.3f %9.2f %5.1f%%  %.150s\n", (unsigned long long)entries[i].calls,
            entries[i].total_ns / 1e6, entries[i].total_ns / 1e3 / (double)entries[i].calls,
            total ? 100.0 * entries[i].total_ns / total : 0.0, entries[i].name);
  }
  if (out != stderr) fclose(out);
}

int InitializeInjection(void) {
  const char* skip = getenv("CUPTI_KERNELS_SKIP_MS");
  uint64_t now = 0;
  cuptiGetTimestamp(&now);
  counted_from = now + (skip ? (uint64_t)atoll(skip) * 1000000ull : 0);
  if (cuptiActivityRegisterCallbacks(requested, completed) != CUPTI_SUCCESS) return 0;
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  atexit(report);
  return 1;
}
