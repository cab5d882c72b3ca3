// The CPU kernels for the baseline instruction set of the build.
#define LBW_CPU_KERNELS_FN kernels_default
#define LBW_CPU_ISA_NAME "default"
#include "kernels_impl.h"
