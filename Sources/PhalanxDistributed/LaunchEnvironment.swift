import Foundation

/// Where this process stands in a multi-process run: its rank, the number of ranks, its rank on
/// this host (which picks its GPU), and where rank 0 listens for the rendezvous. Read from the
/// variables a launcher sets.
///
/// Launchers, in order of precedence (the first whose rank variable is set wins):
///
/// | launcher | rank | world size | local rank (GPU ordinal) |
/// |---|---|---|---|
/// | torchrun-style, and `phalanx train --gpus N` | `RANK` | `WORLD_SIZE` | `LOCAL_RANK` (default 0) |
/// | Open MPI (`mpirun`) | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK` (default 0) |
/// | Slurm (`srun`) | `SLURM_PROCID` | `SLURM_NTASKS` | `SLURM_LOCALID` (default 0) |
/// | none | 0 | 1 | 0 |
///
/// Why this order: explicit `RANK`/`WORLD_SIZE` are what a user or our own launcher set on
/// purpose; `mpirun` inside a Slurm allocation leaves the allocation's `SLURM_*` variables in
/// every process (each with the same `SLURM_PROCID`), so Open MPI's must win over Slurm's.
///
/// Rendezvous address: `MASTER_ADDR` and `MASTER_PORT` (default 29500, torchrun's) in every case;
/// under Slurm without `MASTER_ADDR`, the first host of `SLURM_JOB_NODELIST` (or
/// `SLURM_NODELIST`), where Slurm's task 0 runs with the default block distribution. A world of
/// more than one rank needs an address.
public struct LaunchEnvironment: Equatable, Sendable, CustomStringConvertible {
    /// Which launcher's variables were read.
    public enum Launcher: String, Sendable {
        case single, torchrun, openMPI = "open-mpi", slurm
    }

    /// The launcher the values came from.
    public var launcher: Launcher
    /// This process's rank, `0 ..< worldSize`.
    public var rank: Int
    /// The number of processes (one per GPU).
    public var worldSize: Int
    /// The rank on this host; also the CUDA device ordinal this process uses.
    public var localRank: Int
    /// The host rank 0 listens on; nil only for a single process.
    public var masterAddress: String?
    /// The TCP port rank 0 listens on.
    public var masterPort: Int

    /// The port when `MASTER_PORT` is absent (torchrun's default).
    public static let defaultPort = 29500

    /// The CUDA device ordinal of this process: its local rank (every GPU stays visible, as
    /// torchrun does, so NCCL can see the host's topology).
    public var deviceOrdinal: Int { localRank }

    /// `rank 1 of 4 (local 1, open-mpi), rendezvous node01:29500`.
    public var description: String {
        "rank \(rank) of \(worldSize) (local \(localRank), \(launcher.rawValue))"
            + (masterAddress.map { ", rendezvous \($0):\(masterPort)" } ?? "")
    }

    /// The values as given, checked: `worldSize >= 1`, `0 <= rank < worldSize`, `localRank >= 0`,
    /// a port in `1 ... 65535`, and an address when `worldSize > 1`.
    public init(launcher: Launcher, rank: Int, worldSize: Int, localRank: Int, masterAddress: String?,
                masterPort: Int = defaultPort) throws {
        guard worldSize >= 1 else { throw LaunchEnvironmentError("\(launcher.rawValue): the world size is \(worldSize); it must be at least 1") }
        guard (0..<worldSize).contains(rank) else {
            throw LaunchEnvironmentError("\(launcher.rawValue): rank \(rank) is not in 0 ..< \(worldSize) (the world size)")
        }
        guard localRank >= 0 else {
            throw LaunchEnvironmentError("\(launcher.rawValue): local rank \(localRank) is negative")
        }
        guard (1...65535).contains(masterPort) else {
            throw LaunchEnvironmentError("MASTER_PORT \(masterPort) is not a TCP port (1 ... 65535)")
        }
        if worldSize > 1 && (masterAddress ?? "").isEmpty {
            throw LaunchEnvironmentError(
                "\(launcher.rawValue): \(worldSize) ranks need a rendezvous host: set MASTER_ADDR to rank 0's host name or address"
                + (launcher == .slurm ? " (or run under a job whose SLURM_JOB_NODELIST is set)" : ""))
        }
        self.launcher = launcher
        self.rank = rank
        self.worldSize = worldSize
        self.localRank = localRank
        self.masterAddress = masterAddress.flatMap { $0.isEmpty ? nil : $0 }
        self.masterPort = masterPort
    }

    /// Reads `environment` as the type's summary describes.
    ///
    /// - Throws: `LaunchEnvironmentError` for a value that is not a whole number, a rank variable
    ///   without its world-size variable, a rank outside the world, a missing address for several
    ///   ranks, or a bad Slurm node list.
    public static func detect(_ environment: [String: String]) throws -> LaunchEnvironment {
        func number(_ name: String) throws -> Int? {
            guard let text = environment[name]?.trimmingCharacters(in: .whitespaces), !text.isEmpty else { return nil }
            guard let value = Int(text) else { throw LaunchEnvironmentError("\(name)=\(text) is not a whole number") }
            return value
        }
        let port = try number("MASTER_PORT") ?? defaultPort
        let address = environment["MASTER_ADDR"].flatMap { $0.isEmpty ? nil : $0 }
        let launchers: [(Launcher, rank: String, size: String, local: String)] = [
            (.torchrun, "RANK", "WORLD_SIZE", "LOCAL_RANK"),
            (.openMPI, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
            (.slurm, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
        ]
        for (launcher, rankName, sizeName, localName) in launchers {
            guard let rank = try number(rankName) else { continue }
            guard let size = try number(sizeName) else {
                throw LaunchEnvironmentError("\(rankName) is set (\(rank)) but \(sizeName) is not: both are needed")
            }
            var rendezvous = address
            if launcher == .slurm && rendezvous == nil,
               let nodes = environment["SLURM_JOB_NODELIST"] ?? environment["SLURM_NODELIST"] {
                rendezvous = try SlurmNodeList.firstHost(nodes)
            }
            return try LaunchEnvironment(launcher: launcher, rank: rank, worldSize: size, localRank: try number(localName) ?? 0,
                                         masterAddress: rendezvous, masterPort: port)
        }
        return try LaunchEnvironment(launcher: .single, rank: 0, worldSize: 1, localRank: 0, masterAddress: address, masterPort: port)
    }
}

/// The launch variables are missing, inconsistent or malformed; the message names the variable.
public struct LaunchEnvironmentError: Error, CustomStringConvertible, Equatable {
    /// What is wrong, naming the variables.
    public let message: String
    init(_ message: String) { self.message = message }
    /// The message.
    public var description: String { message }
}
