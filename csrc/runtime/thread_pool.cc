#include "thread_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

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

#include <unistd.h>

namespace sparsert {
namespace {

// How long an idle worker spins before it sleeps. Long enough to bridge the
// gap between two layers, short enough not to starve torch's own threads.
constexpr auto kSpinTime = std::chrono::microseconds(200);

thread_local bool tls_inside_job = false;

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

  void run(int num_threads, const std::function<void(int, int)>& fn) {
    std::lock_guard<std::mutex> serialize(run_mutex_);
    ensure_workers(num_threads - 1);
    remaining_.store(num_threads - 1, std::memory_order_relaxed);
    {
      // The job and its generation change together, under the lock, so a
      // worker never pairs one generation with another's job.
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      job_threads_ = num_threads;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    tls_inside_job = true;
    fn(0, num_threads);
    tls_inside_job = false;
    // Wait for the others; yield when they take long, so an oversubscribed
    // machine can schedule them instead of this spinning thread.
    for (int i = 0; remaining_.load(std::memory_order_acquire) != 0; ++i) {
      if (i < 2048) SPARSERT_PAUSE(); else std::this_thread::yield();
    }
  }

 private:
  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int index = static_cast<int>(workers_.size());
      // The worker starts from the current generation, read here and not in
      // the new thread, so a job published before it first runs is not missed.
      const uint64_t start = generation_.load(std::memory_order_acquire);
      workers_.emplace_back([this, index, start] { worker_loop(index + 1, start); });
    }
  }

  void worker_loop(int thread_id, uint64_t seen) {
    tls_inside_job = true;
    for (;;) {
      // Spin, then sleep, until the generation moves on.
      uint64_t now = seen;
      const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
      for (int i = 0;; ++i) {
        now = generation_.load(std::memory_order_acquire);
        if (now != seen) break;
        SPARSERT_PAUSE();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() > spin_until) break;
      }
      const std::function<void(int, int)>* job;
      int job_threads;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        if (now == seen) {
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        }
        seen = generation_.load(std::memory_order_acquire);
        if (stopping_) return;
        job = job_;
        job_threads = job_threads_;
      }
      if (job != nullptr && thread_id < job_threads) {
        (*job)(thread_id, job_threads);
        remaining_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  const std::function<void(int, int)>* job_ = nullptr;
  int job_threads_ = 0;
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
  if (num_threads <= 1 || tls_inside_job) {
    for (int t = 0; t < (num_threads < 1 ? 1 : num_threads); ++t) fn(t, num_threads < 1 ? 1 : num_threads);
    return;
  }
  global_pool()->run(num_threads, fn);
}

}  // namespace sparsert
