// small_batch_product_cpu.cpp built for AVX-512 (common/cpu_isa.h); empty where setup.py builds no AVX-512 twins.
#include "common/cpu_isa_avx512.h"
#if defined(PYOPS_AVX512_KERNELS)
#include "ops/conv_bn_relu/small_batch_product_cpu.cpp"
#endif
