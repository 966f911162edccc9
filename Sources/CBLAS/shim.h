// The platform BLAS: OpenBLAS's CBLAS interface on Linux (found through pkg-config).
#include <cblas.h>
