import Dispatch
import Glibc

/// `phalanx train --device cuda --gpus N` on one host: N worker processes of the same program,
/// one per GPU, each told its place by torchrun-style variables, watched until all finish.
public enum WorkerLaunch {
    /// The environments of `gpus` workers: `base` plus, for worker `r`,
    ///
    ///     RANK=r  WORLD_SIZE=gpus  LOCAL_RANK=r  LOCAL_WORLD_SIZE=gpus
    ///     MASTER_ADDR=127.0.0.1  MASTER_PORT=port  NCCL_NVLS_ENABLE=0 (unless base sets it)
    ///
    /// Worker `r` uses GPU `r` (`LaunchEnvironment.deviceOrdinal`); every GPU stays visible to
    /// every worker, as under torchrun, so NCCL sees the NVLink topology.
    public static func environments(gpus: Int, port: Int, base: [String: String]) -> [[String: String]] {
        (0..<gpus).map { rank in
            var environment = base
            environment["RANK"] = String(rank)
            environment["WORLD_SIZE"] = String(gpus)
            environment["LOCAL_RANK"] = String(rank)
            environment["LOCAL_WORLD_SIZE"] = String(gpus)
            environment["MASTER_ADDR"] = "127.0.0.1"
            environment["MASTER_PORT"] = String(port)
            environment["NCCL_NVLS_ENABLE"] = base["NCCL_NVLS_ENABLE"] ?? "0"
            return environment
        }
    }

    /// A TCP port free on 127.0.0.1 now (the kernel's choice for port 0). Another program could
    /// take it before rank 0 listens; rank 0 then fails naming the port, and a rerun picks anew.
    public static func freePort() throws -> Int {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw WorkerLaunchError("socket(): \(Socket.errorText())") }
        defer { close(descriptor) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(descriptor, $0, length) == 0 && getsockname(descriptor, $0, &length) == 0
            }
        }
        guard ok else { throw WorkerLaunchError("no free port on 127.0.0.1: \(Socket.errorText())") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// Starts `executable` with `arguments` once per environment (`posix_spawn`; standard input,
    /// output and error are this process's, the signal mask empty), and waits (`waitpid`, polled
    /// every 20 ms). When a worker exits with a non-zero status or is killed by a signal, the
    /// others still running are sent SIGTERM, and SIGKILL `grace` seconds later if they are still
    /// there (a worker waiting at a collective with a dead peer cannot finish its step; its last
    /// checkpoint is safe, as checkpoints are replaced atomically). When `stopRequested` first
    /// returns true (this process was asked to stop), every worker is sent SIGTERM once, and the
    /// wait goes on while they save and exit.
    ///
    /// - Returns: normally, after every worker exited with status 0.
    /// - Throws: `WorkerFailure` naming the first worker seen failing and its status;
    ///   `WorkerLaunchError` when a worker cannot be started.
    public static func run(_ executable: String, arguments: [String], environments: [[String: String]],
                           grace: Double = 10, stopRequested: () -> Bool = { false }) throws {
        var running: [Int: pid_t] = [:]
        var failure: WorkerFailure?
        func stopAll() { for pid in running.values { kill(pid, SIGTERM) } }
        for (rank, environment) in environments.enumerated() {
            do { running[rank] = try spawn(executable, arguments, environment) } catch {
                stopAll()
                for pid in running.values { waitpid(pid, nil, 0) }
                throw error
            }
        }
        var forwarded = false
        var killAt: DispatchTime?
        while !running.isEmpty {
            if let deadline = killAt, DispatchTime.now() >= deadline {
                for pid in running.values { kill(pid, SIGKILL) }
                killAt = nil
            }
            if !forwarded && stopRequested() {
                forwarded = true
                stopAll()
            }
            for (rank, pid) in running.sorted(by: { $0.key < $1.key }) {
                var status: Int32 = 0
                guard waitpid(pid, &status, WNOHANG) == pid else { continue }
                running[rank] = nil
                // The wait status: low 7 bits the signal (0: exited), bits 8-15 the exit code.
                let signal = status & 0x7F, code = (status >> 8) & 0xFF
                if failure == nil && (signal != 0 || code != 0) {
                    failure = WorkerFailure(rank: rank, status: signal != 0 ? signal : code, signaled: signal != 0)
                    stopAll()
                    killAt = DispatchTime.now() + grace
                }
            }
            usleep(20_000)
        }
        if let failure { throw failure }
    }

    /// Starts `path` with `arguments` and exactly `environment`; returns its process id.
    private static func spawn(_ path: String, _ arguments: [String], _ environment: [String: String]) throws -> pid_t {
        let argv = ([path] + arguments).map { strdup($0) } + [nil]
        let envp = environment.sorted { $0.key < $1.key }.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { for pointer in argv + envp { free(pointer) } }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK))
        var pid: pid_t = 0
        let result = posix_spawn(&pid, path, nil, &attributes, argv, envp)
        guard result == 0 else { throw WorkerLaunchError("cannot start worker \(path): \(String(cString: strerror(result)))") }
        return pid
    }
}

/// A worker process failed; the others were stopped.
public struct WorkerFailure: Error, CustomStringConvertible, Equatable {
    /// The worker's rank.
    public let rank: Int
    /// Its exit status, or the signal that ended it.
    public let status: Int32
    /// Whether `status` is a signal.
    public let signaled: Bool

    /// `worker rank 1 exited with status 3; the other workers were stopped`.
    public var description: String {
        "worker rank \(rank) \(signaled ? "was killed by signal" : "exited with status") \(status); the other workers were stopped"
    }
}

/// The workers could not be started (no free port, an executable that cannot be run).
public struct WorkerLaunchError: Error, CustomStringConvertible {
    /// What failed.
    public let message: String
    init(_ message: String) { self.message = message }
    /// The message.
    public var description: String { message }
}
