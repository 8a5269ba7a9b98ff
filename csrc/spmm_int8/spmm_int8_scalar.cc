// Portable int8 kernels: plain integer loops (the compiler vectorises what the target has).
#define SPARSERT_ISA scalar
#include "spmm_int8/spmm_int8_impl.h"

namespace sparsert {
namespace scalar {

void register_int8_kernels(std::vector<Int8KernelInfo>& out) { add_int8_kernels<1>(out); }

}  // namespace scalar
}  // namespace sparsert
