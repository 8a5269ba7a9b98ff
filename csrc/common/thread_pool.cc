#include "common/thread_pool.h"

#include "common/arg_checks.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#ifdef SPARSERT_HAVE_OPENMP
#include <omp.h>
#endif

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

  // num_tasks tasks on up to num_threads threads (the caller among them).
  void run(int num_tasks, int num_threads, const std::function<void(int, int)>& fn) {
    std::lock_guard<std::mutex> serialize(run_mutex_);
    ensure_workers(num_threads - 1);
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

// GNU OpenMP is not fork-safe: a child forked after the parent ran a
// parallel region hangs in its first one (torch's own ops included). Our
// kernels then run on the pool instead, which a child can start afresh, so
// sparse layers keep working in prefork servers and DataLoader workers.
std::atomic<bool> openmp_started{false};
std::atomic<bool> openmp_unusable_after_fork{false};

#ifdef SPARSERT_HAVE_OPENMP
// One OpenMP parallel region; tasks are claimed from a counter as in the
// pool, so a thread that joins late (or a team smaller than asked for)
// costs nothing but its share. Only OpenMP 3.0 entry points are used, so
// any libgomp torch ships resolves them.
void openmp_run(int num_tasks, int num_threads, const std::function<void(int, int)>& fn) {
  openmp_started.store(true, std::memory_order_relaxed);
  std::atomic<int> next{0};
#pragma omp parallel num_threads(num_threads)
  {
    tls_inside_job = true;
    for (int t = next.fetch_add(1, std::memory_order_relaxed); t < num_tasks;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(t, num_tasks);
    }
    tls_inside_job = false;
  }
}
constexpr bool kHaveOpenMP = true;
#else
constexpr bool kHaveOpenMP = false;
#endif

enum class Backend { kOpenMP, kPool };

Backend parse_backend(const char* name) {
  if (std::strcmp(name, "pool") == 0) return Backend::kPool;
  if (std::strcmp(name, "openmp") == 0) {
    if (!kHaveOpenMP) {
      throw std::invalid_argument("this build of sparsert has no OpenMP: use the 'pool' backend");
    }
    return Backend::kOpenMP;
  }
  throw std::invalid_argument(std::string("unknown threading backend '") + name +
                              "': expected 'openmp' or 'pool'");
}

std::atomic<Backend>& backend_state() {
  static std::atomic<Backend> state{[] {
    const char* env = std::getenv("SPARSERT_THREADING");
    pthread_atfork(nullptr, nullptr, [] {
      if (openmp_started.load()) openmp_unusable_after_fork.store(true);
    });
    if (env != nullptr && *env != '\0') return parse_backend(env);
    return kHaveOpenMP ? Backend::kOpenMP : Backend::kPool;
  }()};
  return state;
}

}  // namespace

bool openmp_available() { return kHaveOpenMP; }

std::string openmp_library() {
#ifdef SPARSERT_HAVE_OPENMP
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&omp_in_parallel), &info) != 0 && info.dli_fname != nullptr)
    return info.dli_fname;
#endif
  return std::string();
}

const char* threading_backend() {
  return backend_state().load() == Backend::kOpenMP ? "openmp" : "pool";
}

void set_threading_backend(const char* name) { backend_state().store(parse_backend(name)); }

void parallel_run(int num_threads, const std::function<void(int, int)>& fn) {
  const int n = num_threads < 1 ? 1 : num_threads;
#ifdef SPARSERT_HAVE_OPENMP
  const bool nested = tls_inside_job || omp_in_parallel();
#else
  const bool nested = tls_inside_job;
#endif
  if (n == 1 || nested) {
    for (int t = 0; t < n; ++t) fn(t, n);
    return;
  }
  // An exception must not leave a worker thread (an OpenMP region or a pool
  // thread would terminate the process, e.g. on a failed allocation): the
  // first one is kept, the tasks not yet started are skipped, and it is
  // rethrown here once every thread is done.
  struct Errors {
    const std::function<void(int, int)>* fn;
    std::atomic<bool> failed{false};
    std::mutex mutex;
    std::exception_ptr first;
  } errors;
  errors.fn = &fn;
  // Captures one pointer, so std::function stores it without allocating.
  const std::function<void(int, int)> guarded = [e = &errors](int t, int nt) {
    if (e->failed.load(std::memory_order_relaxed)) return;
    try {
      (*e->fn)(t, nt);
    } catch (...) {
      std::lock_guard<std::mutex> lock(e->mutex);
      if (!e->first) e->first = std::current_exception();
      e->failed.store(true, std::memory_order_relaxed);
    }
  };
  // Tasks are claimed dynamically, so fewer threads than tasks is correct.
  const int threads = n < kMaxThreads ? n : kMaxThreads;
#ifdef SPARSERT_HAVE_OPENMP
  if (backend_state().load(std::memory_order_relaxed) == Backend::kOpenMP &&
      !openmp_unusable_after_fork.load(std::memory_order_relaxed)) {
    openmp_run(n, threads, guarded);
  } else {
    global_pool()->run(n, threads, guarded);
  }
#else
  global_pool()->run(n, threads, guarded);
#endif
  if (errors.first) std::rethrow_exception(errors.first);
}

}  // namespace sparsert
