// A small fork-join thread pool for the kernels.
//
// sparsert owns its threads instead of using OpenMP so that the extension
// never loads a second OpenMP runtime beside torch's. Workers spin briefly
// after a job (a Linear layer is followed by another within microseconds)
// and then sleep on a condition variable so an idle process burns no CPU.
#pragma once

#include <functional>

namespace sparsert {

// Runs fn(task, num_threads) for every task in [0, num_threads) and returns
// when all have finished. Up to num_threads threads (the caller among them)
// claim tasks dynamically, so a worker the OS is slow to schedule does not
// hold the call up. Per-thread scratch must be thread_local, not per task.
// Calls from inside a running job, or with num_threads <= 1, run inline.
void parallel_run(int num_threads, const std::function<void(int, int)>& fn);

}  // namespace sparsert
