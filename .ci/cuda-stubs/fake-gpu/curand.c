/* cuRAND for the fake GPU of cuda.c: a seeded generator can be made and
 * bound to a stream (candle makes one when it opens a device); drawing
 * numbers returns the generated stub's failure. */
typedef int curandStatus_t;
static int token;
curandStatus_t curandCreateGenerator(void **generator, int kind) { (void)kind; *generator = &token; return 0; }
curandStatus_t curandDestroyGenerator(void *generator) { (void)generator; return 0; }
curandStatus_t curandSetStream(void *generator, void *stream) { (void)generator; (void)stream; return 0; }
curandStatus_t curandSetPseudoRandomGeneratorSeed(void *generator, unsigned long long seed) { (void)generator; (void)seed; return 0; }
curandStatus_t curandSetGeneratorOffset(void *generator, unsigned long long offset) { (void)generator; (void)offset; return 0; }
