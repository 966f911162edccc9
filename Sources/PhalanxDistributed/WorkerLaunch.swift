import Foundation
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
        guard descriptor >= 0 else { throw RendezvousError("socket(): \(Socket.errorText())") }
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
        guard ok else { throw RendezvousError("no free port on 127.0.0.1: \(Socket.errorText())") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// Starts `executable` with `arguments` once per environment, and waits. When a worker exits
    /// with a non-zero status (or a signal), the others still running are sent SIGTERM, so no
    /// worker is left waiting at a collective for its timeout.
    ///
    /// - Returns: normally, after every worker exited with status 0.
    /// - Throws: `WorkerFailure` naming the first worker that failed and its status.
    public static func run(_ executable: URL, arguments: [String], environments: [[String: String]],
                           output: FileHandle? = nil) throws {
        var workers: [Process] = []
        for environment in environments {
            let process = Process()
            process.executableURL = executable
            process.arguments = arguments
            process.environment = environment
            if let output { process.standardOutput = output }
            try process.run()
            workers.append(process)
        }
        var failure: WorkerFailure?
        while workers.contains(where: \.isRunning) {
            if failure == nil, let rank = workers.indices.first(where: { !workers[$0].isRunning && workers[$0].terminationStatus != 0 }) {
                let worker = workers[rank]
                failure = WorkerFailure(rank: rank, status: worker.terminationStatus,
                                        signaled: worker.terminationReason == .uncaughtSignal)
                for other in workers where other.isRunning { kill(other.processIdentifier, SIGTERM) }
            }
            usleep(20_000)
        }
        if let failure { throw failure }
        if let rank = workers.indices.first(where: { workers[$0].terminationStatus != 0 }) {
            throw WorkerFailure(rank: rank, status: workers[rank].terminationStatus, signaled: workers[rank].terminationReason == .uncaughtSignal)
        }
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
