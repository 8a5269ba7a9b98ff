// A small fork-join thread pool for the kernels.
//
// sparsert owns its threads instead of using OpenMP so that the extension
// never loads a second OpenMP runtime beside torch's. Workers spin briefly
// after a job (a Linear layer is followed by another within microseconds)
// and then sleep on a condition variable so an idle process burns no CPU.
#pragma once

#include <functional>

namespace sparsert {

// Runs fn(thread_id, num_threads) for thread_id in [0, num_threads) and
// returns when all have finished. The calling thread runs thread_id 0.
// Calls from inside a running job, or with num_threads <= 1, run inline.
void parallel_run(int num_threads, const std::function<void(int, int)>& fn);

}  // namespace sparsert
