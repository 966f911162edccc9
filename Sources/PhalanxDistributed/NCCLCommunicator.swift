import PhalanxCUDA
import PhalanxLayers
import PhalanxRuntime

/// The `Communicator` of a real multi-GPU run: one NCCL communicator per process, on the
/// process's GPU, joined through `Rendezvous` (rank 0 makes the NCCL unique id and hands it out
/// over TCP).
///
/// Every collective runs on NCCL's own stream, after the work queued on the device's stream
/// before it (`NCCLComm`). Gradient reductions are not waited for one by one: the trainer starts
/// each bucket's as soon as backward has produced it, and they run while backward goes on;
/// `finishReductions` then waits for all. Every wait is `NCCLComm.wait`, which polls NCCL's
/// asynchronous error and gives up after `timeout` seconds: a dead or stalled rank makes this one
/// throw, and its communicator is aborted.
public final class NCCLCommunicator: Communicator, @unchecked Sendable {
    /// The NCCL communicator.
    public let comm: NCCLComm
    /// Seconds a collective may take before the run is declared failed.
    public let timeout: Double
    /// This rank.
    public var rank: Int { comm.rank }
    /// The number of ranks.
    public var worldSize: Int { comm.worldSize }

    /// Joins the run described by `launch` on `device` (which should be GPU `launch.deviceOrdinal`):
    /// rendezvous, then `ncclCommInitRank`.
    ///
    /// - Throws: `CUDAUnavailable` without NCCL, `RendezvousError` when a rank does not arrive
    ///   within `timeout`, `NCCLError` when NCCL fails.
    public init(launch: LaunchEnvironment, device: CUDADevice, timeout: Double = 300) throws {
        let nccl = try NCCL.shared.get()
        let id = try Rendezvous.share(launch.rank == 0 ? nccl.uniqueId() : nil, launch: launch, timeout: timeout)
        comm = try NCCLComm(uniqueId: id, rank: launch.rank, worldSize: launch.worldSize, context: device.context, nccl: nccl)
        self.timeout = timeout
    }

    /// Queues `ncclAllReduce` with `ncclAvg` of every tensor, in one NCCL group.
    public func allReduceAverage(_ bucket: [Tensor]) throws {
        try comm.allReduce(try buffers(bucket, "allReduceAverage"), format: .float32, .average)
    }

    /// Waits for every queued reduction.
    public func finishReductions() throws { try comm.wait(timeout: timeout) }

    /// `ncclBroadcast` of every tensor from rank 0, in one group, then waits.
    public func broadcast(_ tensors: [Tensor]) throws {
        try comm.broadcast(try buffers(tensors, "broadcast"))
        try comm.wait(timeout: timeout)
    }

    /// Rank 0's byte count, then its bytes, each through a device buffer.
    public func broadcast(_ bytes: [UInt8]) throws -> [UInt8] {
        let size = try DeviceBuffer(context: comm.context, byteCount: 8)
        try size.upload([UInt64(bytes.count)])
        try comm.broadcast([size])
        try comm.wait(timeout: timeout)
        let count = Int(try size.download(UInt64.self, count: 1)[0])
        let payload = try DeviceBuffer(context: comm.context, byteCount: count)
        if rank == 0 { try payload.upload(bytes) }
        try comm.broadcast([payload])
        try comm.wait(timeout: timeout)
        return try payload.download(UInt8.self, count: count)
    }

    /// An all-reduce of one number, waited for.
    public func barrier(timeout: Double?) throws {
        let token = try DeviceBuffer(context: comm.context, floats: [0])
        try comm.allReduce([token], format: .float32, .sum)
        try comm.wait(timeout: timeout ?? self.timeout)
    }

    /// `ncclCommGetAsyncError`.
    public func checkHealth() throws { try comm.checkAsyncError() }

    private func buffers(_ tensors: [Tensor], _ what: String) throws -> [DeviceBuffer] {
        try tensors.map { tensor in
            guard tensor.device.cuda != nil, tensor.format == .float32 else {
                throw CommunicatorError("NCCLCommunicator.\(what): a \(tensor.format) tensor \(tensor.shape) on \(tensor.device); NCCL reduces float32 tensors on the GPU")
            }
            return tensor.deviceBuffer
        }
    }
}
