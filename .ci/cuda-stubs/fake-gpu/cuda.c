/* A driver for a GPU that opens but cannot run a kernel: what a machine
 * has when candle's kernels were built for another GPU generation, or when
 * the driver is too old for them. gen_stubs.py --fake compiles this file
 * into libcuda.so.1 in place of the stub functions it defines (the others
 * still return CUDA_ERROR_STUB_LIBRARY, and name themselves on stderr).
 *
 * One device, "NIN CI fake GPU", whose compute capability is
 * NIN_FAKE_COMPUTE_CAP (e.g. "86"; 90 if unset). Contexts, streams and
 * events are tokens. Device memory is host memory, so copies work. Loading
 * a module fails with CUDA_ERROR_NO_BINARY_FOR_GPU (209), as a real
 * driver does for PTX or cubins of another architecture. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUtoken;

enum {
  SUCCESS = 0,
  INVALID_VALUE = 1,
  OUT_OF_MEMORY = 2,
  INVALID_DEVICE = 101,
  NO_BINARY_FOR_GPU = 209,
};

static int token; /* contexts, streams, events and handles point here */

static int compute_cap(void) {
  const char *cap = getenv("NIN_FAKE_COMPUTE_CAP");
  return cap && *cap ? atoi(cap) : 90;
}

CUresult cuInit(unsigned flags) { (void)flags; return SUCCESS; }
CUresult cuDriverGetVersion(int *version) { *version = 13000; return SUCCESS; }
CUresult cuDeviceGetCount(int *count) { *count = 1; return SUCCESS; }

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
  if (ordinal != 0) return INVALID_DEVICE;
  *device = 0;
  return SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
  (void)device;
  strncpy(name, "NIN CI fake GPU", (size_t)len);
  if (len > 0) name[len - 1] = 0;
  return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice device) {
  (void)device;
  *bytes = (size_t)1 << 30;
  return SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
  *free_bytes = *total = (size_t)1 << 30;
  return SUCCESS;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
  (void)device;
  switch (attribute) {
  case 75: *value = compute_cap() / 10; break;  /* COMPUTE_CAPABILITY_MAJOR */
  case 76: *value = compute_cap() % 10; break;  /* COMPUTE_CAPABILITY_MINOR */
  case 115: *value = 0; break;                  /* MEMORY_POOLS_SUPPORTED */
  default: *value = 1; break;
  }
  return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUtoken *ctx, CUdevice device) {
  (void)device;
  *ctx = &token;
  return SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) { (void)device; return SUCCESS; }

static CUtoken current;
CUresult cuCtxSetCurrent(CUtoken ctx) { current = ctx; return SUCCESS; }
CUresult cuCtxGetCurrent(CUtoken *ctx) { *ctx = current; return SUCCESS; }
CUresult cuCtxPushCurrent_v2(CUtoken ctx) { current = ctx; return SUCCESS; }
CUresult cuCtxPopCurrent_v2(CUtoken *ctx) { if (ctx) *ctx = current; return SUCCESS; }
CUresult cuCtxGetDevice(CUdevice *device) { *device = 0; return SUCCESS; }
CUresult cuCtxSynchronize(void) { return SUCCESS; }

CUresult cuStreamCreate(CUtoken *stream, unsigned flags) { (void)flags; *stream = &token; return SUCCESS; }
CUresult cuStreamDestroy_v2(CUtoken stream) { (void)stream; return SUCCESS; }
CUresult cuStreamSynchronize(CUtoken stream) { (void)stream; return SUCCESS; }
CUresult cuStreamQuery(CUtoken stream) { (void)stream; return SUCCESS; }
CUresult cuStreamWaitEvent(CUtoken stream, CUtoken event, unsigned flags) {
  (void)stream; (void)event; (void)flags;
  return SUCCESS;
}
CUresult cuStreamIsCapturing(CUtoken stream, int *status) { (void)stream; *status = 0; return SUCCESS; }

CUresult cuEventCreate(CUtoken *event, unsigned flags) { (void)flags; *event = &token; return SUCCESS; }
CUresult cuEventDestroy_v2(CUtoken event) { (void)event; return SUCCESS; }
CUresult cuEventRecord(CUtoken event, CUtoken stream) { (void)event; (void)stream; return SUCCESS; }
CUresult cuEventSynchronize(CUtoken event) { (void)event; return SUCCESS; }
CUresult cuEventQuery(CUtoken event) { (void)event; return SUCCESS; }

CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t bytes) {
  void *p = calloc(bytes ? bytes : 1, 1);
  if (!p) return OUT_OF_MEMORY;
  *ptr = (CUdeviceptr)(uintptr_t)p;
  return SUCCESS;
}
CUresult cuMemAllocAsync(CUdeviceptr *ptr, size_t bytes, CUtoken stream) {
  (void)stream;
  return cuMemAlloc_v2(ptr, bytes);
}
CUresult cuMemFree_v2(CUdeviceptr ptr) { free((void *)(uintptr_t)ptr); return SUCCESS; }
CUresult cuMemFreeAsync(CUdeviceptr ptr, CUtoken stream) { (void)stream; return cuMemFree_v2(ptr); }

#define DEV(p) ((void *)(uintptr_t)(p))
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) { memcpy(DEV(dst), src, n); return SUCCESS; }
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) { memcpy(dst, DEV(src), n); return SUCCESS; }
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) { memmove(DEV(dst), DEV(src), n); return SUCCESS; }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUtoken s) { (void)s; return cuMemcpyHtoD_v2(dst, src, n); }
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUtoken s) { (void)s; return cuMemcpyDtoH_v2(dst, src, n); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUtoken s) { (void)s; return cuMemcpyDtoD_v2(dst, src, n); }
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { memset(DEV(dst), v, n); return SUCCESS; }
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUtoken s) { (void)s; return cuMemsetD8_v2(dst, v, n); }

/* The point of this driver: no kernel image runs on this GPU. */
CUresult cuModuleLoadData(CUtoken *module, const void *image) { (void)module; (void)image; return NO_BINARY_FOR_GPU; }
CUresult cuModuleLoadDataEx(CUtoken *module, const void *image, unsigned n, void *options, void **values) {
  (void)n; (void)options; (void)values;
  return cuModuleLoadData(module, image);
}

static const char *error_text(CUresult error, int name) {
  switch (error) {
  case SUCCESS: return name ? "CUDA_SUCCESS" : "no error";
  case INVALID_DEVICE: return name ? "CUDA_ERROR_INVALID_DEVICE" : "invalid device ordinal";
  case NO_BINARY_FOR_GPU:
    return name ? "CUDA_ERROR_NO_BINARY_FOR_GPU" : "no kernel image is available for execution on the device";
  default: return 0;
  }
}
CUresult cuGetErrorString(CUresult error, const char **text) {
  *text = error_text(error, 0);
  return *text ? SUCCESS : INVALID_VALUE;
}
CUresult cuGetErrorName(CUresult error, const char **text) {
  *text = error_text(error, 1);
  return *text ? SUCCESS : INVALID_VALUE;
}
