#pragma once
// Controls of the simt runtime for the host: the thread order within a barrier interval (the
// race check runs an op under each and compares), and the error count.
#include <cstdint>

namespace simt {

enum Schedule : int { kScheduleForward = 0, kScheduleReverse = 1, kScheduleShuffle = 2 };

void set_schedule(int mode, uint64_t seed);
int get_schedule();
// The grid-size limits (CUDA's by default); set_max_grid returns the previous y limit.
int max_grid(int dim);
int set_max_grid(int y, int z);
// Errors recorded since the library loaded (launch checks take the first of each launch).
long error_count();

}  // namespace simt
