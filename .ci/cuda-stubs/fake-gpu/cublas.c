/* cuBLAS for the fake GPU of cuda.c: a handle can be made and bound to a
 * stream (candle makes one when it opens a device); anything else returns
 * the generated stub's failure. */
typedef int cublasStatus_t;
static int token;
cublasStatus_t cublasCreate_v2(void **handle) { *handle = &token; return 0; }
cublasStatus_t cublasDestroy_v2(void *handle) { (void)handle; return 0; }
cublasStatus_t cublasSetStream_v2(void *handle, void *stream) { (void)handle; (void)stream; return 0; }
