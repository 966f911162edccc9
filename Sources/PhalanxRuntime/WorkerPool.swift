#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CPhalanxIntrinsics
import Foundation
import Synchronization

/// A small pool of persistent threads for data-parallel loops.
///
/// `run(count) { i in ... }` calls the body once for every `i` in `0..<count`, on the calling
/// thread and the pool's workers together, and returns when all calls have finished. Indices are
/// handed out one at a time from a shared counter, so uneven items balance themselves.
///
/// Why not `DispatchQueue.concurrentPerform`: it wakes its threads on every call, measured at about
/// 40 µs on the 2-core development machine, longer than many of our kernels take. Here the workers
/// spin (with a `pause` hint) for a short while after each job, so a job that follows another
/// starts in well under a microsecond; a worker idle for longer than `spinDuration` parks on a
/// condition variable and costs nothing.
///
/// The body runs on several threads at once: each call must write only memory that no other
/// index touches (the kernels give each index its own sequences, heads or rows). It is not
/// `@Sendable` so that kernels can capture their raw buffer pointers directly; that promise of
/// disjoint writes is what makes the capture safe, as with `concurrentPerform`.
///
/// Re-entrancy: a `run` issued while the pool is busy (from a worker, or from a second thread such
/// as a concurrently running test) executes inline on its caller. Results never depend on how many
/// threads took part.
public final class WorkerPool: @unchecked Sendable {
    /// The process-wide pool: one thread per core, or `PHALANX_THREADS` if that is set.
    public static let shared = WorkerPool(threadCount: defaultThreadCount())

    /// Threads that take part in a job, the caller included.
    public let threadCount: Int

    private final class Worker: Sendable {
        /// Generation of the job this worker has been told to join.
        let start = Atomic<Int>(0)
        /// Generation of the last job this worker has finished.
        let finished = Atomic<Int>(0)
    }

    private let workers: [Worker]
    private let busy = Atomic<Bool>(false)
    private let nextIndex = Atomic<Int>(0)
    private let sleepers = Atomic<Int>(0)
    private var generation = 0
    private var jobCount = 0
    private var job: ((Int) -> Void)?
    private let parkLock: UnsafeMutablePointer<pthread_mutex_t>
    private let parkSignal: UnsafeMutablePointer<pthread_cond_t>
    private let spinDuration: Duration = .milliseconds(2)

    /// Creates a pool; `threadCount - 1` worker threads are started (the caller is the last one).
    public init(threadCount: Int) {
        require(threadCount >= 1, "WorkerPool needs at least one thread, got \(threadCount)")
        self.threadCount = threadCount
        workers = (1..<threadCount).map { _ in Worker() }
        parkLock = .allocate(capacity: 1)
        parkSignal = .allocate(capacity: 1)
        pthread_mutex_init(parkLock, nil)
        pthread_cond_init(parkSignal, nil)
        for worker in workers {
            let thread = Thread { [unowned self] in self.serve(worker) }
            thread.name = "phalanx-worker"
            thread.start()
        }
    }

    /// Calls `body(i)` for every `i` in `0..<count`, spread over the pool's threads.
    public func run(_ count: Int, _ body: (Int) -> Void) {
        guard count > 1, threadCount > 1,
              busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged
        else {
            for i in 0..<count { body(i) }
            return
        }
        withoutActuallyEscaping(body) { body in
            job = body
            jobCount = count
            nextIndex.store(0, ordering: .relaxed)
            generation += 1
            let helpers = min(workers.count, count - 1)
            for worker in workers.prefix(helpers) {
                worker.start.store(generation, ordering: .sequentiallyConsistent)
            }
            if sleepers.load(ordering: .sequentiallyConsistent) > 0 {
                pthread_mutex_lock(parkLock)
                pthread_cond_broadcast(parkSignal)
                pthread_mutex_unlock(parkLock)
            }
            drain()
            for worker in workers.prefix(helpers) {
                while worker.finished.load(ordering: .acquiring) != generation {
                    phalanx_spin_pause()
                }
            }
            job = nil
        }
        busy.store(false, ordering: .releasing)
    }

    /// Takes indices from the shared counter until none are left.
    private func drain() {
        guard let job else { return }
        while true {
            let i = nextIndex.add(1, ordering: .relaxed).oldValue
            if i >= jobCount { return }
            job(i)
        }
    }

    private func serve(_ worker: Worker) {
        var seen = 0
        let clock = ContinuousClock()
        while true {
            var idleSince = clock.now
            var spins = 0
            while worker.start.load(ordering: .acquiring) == seen {
                phalanx_spin_pause()
                spins += 1
                if spins & 1023 == 0, clock.now - idleSince > spinDuration {
                    park(worker, seen: seen)
                    idleSince = clock.now
                }
            }
            seen = worker.start.load(ordering: .acquiring)
            drain()
            worker.finished.store(seen, ordering: .releasing)
        }
    }

    /// Sleeps until the worker is given a generation other than `seen`. The sleeper count is
    /// raised before the last look at `start`, and `run` reads it after publishing `start`
    /// (both sequentially consistent), so one of the two always sees the other: no lost wake-up.
    private func park(_ worker: Worker, seen: Int) {
        pthread_mutex_lock(parkLock)
        sleepers.add(1, ordering: .sequentiallyConsistent)
        while worker.start.load(ordering: .sequentiallyConsistent) == seen {
            pthread_cond_wait(parkSignal, parkLock)
        }
        sleepers.subtract(1, ordering: .sequentiallyConsistent)
        pthread_mutex_unlock(parkLock)
    }

    private static func defaultThreadCount() -> Int {
        if let text = ProcessInfo.processInfo.environment["PHALANX_THREADS"], let n = Int(text), n >= 1 {
            return n
        }
        return ProcessInfo.processInfo.activeProcessorCount
    }
}
