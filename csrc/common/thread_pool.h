// Fork-join parallelism for the kernels, with two interchangeable backends.
//
// "openmp" (the default where the build found OpenMP): each call is one
// OpenMP parallel region. The extension links libgomp by its soname
// (libgomp.so.1), the soname torch's wheel ships, so in a process that
// imported torch first the loader hands us torch's very runtime: our
// kernels and torch's dense ops run on the same threads. Two pools on two
// cores fight: after each op the other pool's workers keep spinning on the
// core the next op needs (measured, BERT-base 90% 4x1 end to end: 3.86x
// on the pool, 5.04x on torch's team; see benchmarks/RESULTS.md).
//
// "pool": sparsert's own threads. Workers spin briefly after a job and then
// sleep on a condition variable. The fallback where there is no OpenMP, and
// the better choice when the host process does not use OpenMP.
#pragma once

#include <functional>
#include <string>

namespace sparsert {

// Backend names: "openmp" or "pool". set_threading_backend throws
// std::invalid_argument for an unknown or unavailable name. The
// SPARSERT_THREADING environment variable picks the initial backend.
const char* threading_backend();
void set_threading_backend(const char* name);
bool openmp_available();
// The file of the OpenMP runtime the kernels use ("" without OpenMP), so the
// Python side can check it is the one torch uses.
std::string openmp_library();

// Runs fn(task, num_threads) for every task in [0, num_threads) and returns
// when all have finished. Up to num_threads threads (the caller among them)
// claim tasks dynamically, so a worker the OS is slow to schedule does not
// hold the call up. Per-thread scratch must be thread_local, not per task.
// Calls from inside a running job, or with num_threads <= 1, run inline. At
// most kMaxThreads (common/arg_checks.h) threads run; tasks beyond that wait
// for a free thread. An exception thrown by a task is rethrown here after
// every thread has finished (the remaining tasks are skipped).
void parallel_run(int num_threads, const std::function<void(int, int)>& fn);

}  // namespace sparsert
