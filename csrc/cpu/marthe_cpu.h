// The CPU launcher: loops over raw buffers, parallel over the threads torch uses.
#pragma once

#include "../marthe_launch.h"

namespace marthe {
namespace cpu {

// ``coeffs`` is host memory (kNumCoeffs float64 values); ok == 0 returns before any write.
void fused_update(const UpdateOptions& opts, const UpdateTable& table, const double* coeffs);

// The dot product accumulated in float64 (rounded by the caller to the accumulation type).
double clipped_dot(const DotTable& table);

bool all_finite(const FiniteTable& table);

}  // namespace cpu
}  // namespace marthe
