#include "thread_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPARSERT_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define SPARSERT_PAUSE() asm volatile("yield")
#else
#define SPARSERT_PAUSE() \
  do {                   \
  } while (0)
#endif

namespace sparsert {
namespace {

// How long an idle worker spins before it sleeps. Spinning bridges the gap
// between two sparse layers, but a spinning worker also steals a core from
// torch's OpenMP threads when a dense op runs next, so it is kept short.
// SPARSERT_SPIN_US overrides it (0 = always sleep).
std::chrono::microseconds spin_time() {
  static const std::chrono::microseconds value = [] {
    const char* env = std::getenv("SPARSERT_SPIN_US");
    return std::chrono::microseconds(env ? std::atol(env) : 50);
  }();
  return value;
}

thread_local bool tls_inside_job = false;

// One parallel_run call. Tasks are claimed from a counter by whichever
// threads show up, so a worker the OS has not scheduled yet (a busy or
// oversubscribed machine) delays nothing: the caller runs its tasks.
struct Job {
  const std::function<void(int, int)>* fn = nullptr;
  int tasks = 0;
  std::atomic<int> next{0};
  std::atomic<int> done{0};

  void participate() {
    for (int t = next.fetch_add(1, std::memory_order_relaxed); t < tasks;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      (*fn)(t, tasks);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <typename Done>
void wait_until(Done is_done) {
  for (int i = 0; !is_done(); ++i) {
    if (i < 2048) SPARSERT_PAUSE(); else std::this_thread::yield();
  }
}

class ThreadPool {
 public:
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int num_tasks, const std::function<void(int, int)>& fn) {
    std::lock_guard<std::mutex> serialize(run_mutex_);
    ensure_workers(num_tasks - 1);
    Job job;
    job.fn = &fn;
    job.tasks = num_tasks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    tls_inside_job = true;
    job.participate();
    tls_inside_job = false;
    wait_until([&] { return job.done.load(std::memory_order_acquire) == num_tasks; });
    {
      // Close the job; workers that already joined it finish (they find no
      // task left) before `job` leaves this stack frame.
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = nullptr;
    }
    wait_until([&] { return active_.load(std::memory_order_acquire) == 0; });
  }

 private:
  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      // The worker starts from the current generation, read here and not in
      // the new thread, so a job published before it first runs is not missed.
      const uint64_t start = generation_.load(std::memory_order_acquire);
      workers_.emplace_back([this, start] { worker_loop(start); });
    }
  }

  void worker_loop(uint64_t seen) {
    tls_inside_job = true;
    for (;;) {
      uint64_t now = seen;
      const auto spin_until = std::chrono::steady_clock::now() + spin_time();
      for (int i = 0;; ++i) {
        now = generation_.load(std::memory_order_acquire);
        if (now != seen) break;
        SPARSERT_PAUSE();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > spin_until) break;
      }
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        if (now == seen) {
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
        seen = generation_.load(std::memory_order_acquire);
        if (stopping_) return;
        job = job_;
        if (job != nullptr) active_.fetch_add(1, std::memory_order_acq_rel);
      }
      if (job != nullptr) {
        job->participate();
        active_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> active_{0};
  Job* job_ = nullptr;
  bool stopping_ = false;
};

ThreadPool* global_pool() {
  // A forked child has no worker threads: give it a fresh pool (the parent's
  // is leaked in the child on purpose, its threads do not exist there).
  static pid_t owner = 0;
  static ThreadPool* pool = nullptr;
  static std::mutex create_mutex;
  std::lock_guard<std::mutex> lock(create_mutex);
  const pid_t me = getpid();
  if (pool == nullptr || owner != me) {
    pool = new ThreadPool();
    owner = me;
  }
  return pool;
}

}  // namespace

void parallel_run(int num_threads, const std::function<void(int, int)>& fn) {
  const int n = num_threads < 1 ? 1 : num_threads;
  if (n == 1 || tls_inside_job) {
    for (int t = 0; t < n; ++t) fn(t, n);
    return;
  }
  global_pool()->run(n, fn);
}

}  // namespace sparsert
