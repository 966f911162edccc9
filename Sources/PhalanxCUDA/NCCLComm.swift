import CNCCL
import Foundation
import PhalanxRuntime

/// One rank's NCCL communicator on one GPU: collectives on device buffers, queued on a stream of
/// their own, and `wait`, which is where errors and stalls are caught.
///
/// Streams: each call to a collective first records an event on the context's (compute) stream
/// and makes the communicator's stream wait for it, so a collective sees every kernel queued
/// before it (the backward pass that produced a gradient) while the compute stream runs on with
/// later work (the rest of backward): reduction overlaps computation. Whoever reads the results
/// calls `wait` first, which returns once the communicator's stream is done.
///
/// Ranks: `worldSize` processes (one per GPU) make a communicator each from the same 128-byte
/// unique id (`NCCL.uniqueId()` on rank 0, handed to the others by `Rendezvous`). Every rank must
/// issue the same collectives in the same order with the same sizes.
///
/// Failure: a collective whose peer died or stalls never finishes on its own. `wait(timeout:)`
/// polls the communicator's stream and `ncclCommGetAsyncError`; on an error or when the time runs
/// out it aborts the communicator (`ncclCommAbort`, which cancels what is queued) and throws an `NCCLError` naming
/// this rank. An aborted communicator refuses further work.
public final class NCCLComm: @unchecked Sendable {
    /// This process's rank, `0 ..< worldSize`.
    public let rank: Int
    /// The number of ranks.
    public let worldSize: Int
    /// The GPU whose stream the collectives are queued on.
    public let context: CUDAContext
    /// The library.
    public let nccl: NCCL
    private let comm: ncclComm_t
    /// The stream the collectives run on, and the event that orders it after the compute stream.
    private let stream: OpaquePointer
    private let computeReached: OpaquePointer
    private let lock = NSLock()
    private var aborted = false

    /// A reduction: the element-wise sum, or the mean over ranks (`ncclAvg`: for floating types
    /// NCCL multiplies each rank's input by `1 / worldSize` and sums).
    public enum Reduction: Sendable {
        case sum, average
        var code: ncclRedOp_t { self == .sum ? 0 : 4 }
    }

    /// Joins the communicator of `worldSize` ranks named by `uniqueId`, as `rank`, on `context`'s
    /// device. Blocks until every rank has joined (NCCL's own rendezvous, without a timeout: run
    /// `Rendezvous` first, which has one).
    ///
    /// - Throws: `CUDAUnavailable` without NCCL; `NCCLError` when `ncclCommInitRank` fails.
    public init(uniqueId: [UInt8], rank: Int, worldSize: Int, context: CUDAContext, nccl: NCCL? = nil) throws {
        require(uniqueId.count == MemoryLayout<ncclUniqueId>.size,
                "NCCLComm: the unique id has \(uniqueId.count) bytes, NCCL's has \(MemoryLayout<ncclUniqueId>.size)")
        require(worldSize >= 1 && (0..<worldSize).contains(rank), "NCCLComm: rank \(rank) is not in 0 ..< \(worldSize)")
        let nccl = try nccl ?? NCCL.shared.get()
        self.nccl = nccl
        self.rank = rank
        self.worldSize = worldSize
        self.context = context
        var id = ncclUniqueId()
        withUnsafeMutableBytes(of: &id) { $0.copyBytes(from: uniqueId) }
        try context.makeCurrent()
        let driver = context.driver
        var stream: OpaquePointer?, event: OpaquePointer?
        // CU_STREAM_NON_BLOCKING (1): the synchronous copies of the legacy default stream must not
        // wait for it, or a collective stuck on a dead peer would hang them where no timeout applies.
        try driver.check(driver.cuStreamCreate(&stream, 1), "cuStreamCreate (NCCL's stream)")
        do {
            // CU_EVENT_DISABLE_TIMING (2): an ordering point only, the cheapest kind.
            try driver.check(driver.cuEventCreate(&event, 2), "cuEventCreate (NCCL's ordering event)")
        } catch {
            _ = driver.cuStreamDestroy(stream)
            throw error
        }
        self.stream = stream!
        computeReached = event!
        var comm: ncclComm_t?
        do {
            try nccl.check(nccl.commInitRank(&comm, Int32(worldSize), id, Int32(rank)),
                           "rank \(rank) of \(worldSize): ncclCommInitRank")
        } catch {
            _ = driver.cuEventDestroy(event)
            _ = driver.cuStreamDestroy(stream)
            throw error
        }
        self.comm = comm!
    }

    deinit {
        if !aborted { _ = nccl.commDestroy(comm) }
        _ = context.driver.cuCtxSetCurrent(context.context)
        _ = context.driver.cuEventDestroy(computeReached)
        _ = context.driver.cuStreamDestroy(stream)
    }

    /// Queues, in one NCCL group, an in-place reduction of each buffer (all of `format` numbers)
    /// across ranks: afterwards every rank's buffer `i` holds the sum or mean of all ranks' buffer `i`.
    public func allReduce(_ buffers: [DeviceBuffer], format: NumberFormat, _ reduction: Reduction) throws {
        try queue("ncclAllReduce(\(buffers.count) buffers, \(format), \(reduction))") {
            for buffer in buffers {
                own(buffer)
                try nccl.check(nccl.allReduce(pointer(buffer), pointer(buffer), count(buffer, format), dataType(format),
                                              reduction.code, comm, stream), "ncclAllReduce")
            }
        }
    }

    /// Queues the reduction of `send` (`worldSize * n` numbers) across ranks, of which this rank
    /// receives part `rank`, numbers `rank * n ..< (rank + 1) * n`, in `receive` (`n` numbers).
    public func reduceScatter(_ send: DeviceBuffer, into receive: DeviceBuffer, format: NumberFormat, _ reduction: Reduction) throws {
        let n = count(receive, format)
        require(count(send, format) == n * worldSize,
                "NCCLComm.reduceScatter: send holds \(count(send, format)) numbers, receive \(n); send must hold worldSize (\(worldSize)) times as many")
        try queue("ncclReduceScatter(\(n) per rank, \(format))") {
            own(send); own(receive)
            try nccl.check(nccl.reduceScatter(pointer(send), pointer(receive), n, dataType(format), reduction.code, comm,
                                              stream), "ncclReduceScatter")
        }
    }

    /// Queues the gathering of every rank's `send` (`n` numbers) into `receive` (`worldSize * n`),
    /// rank `r`'s at numbers `r * n ..< (r + 1) * n`.
    public func allGather(_ send: DeviceBuffer, into receive: DeviceBuffer, format: NumberFormat) throws {
        let n = count(send, format)
        require(count(receive, format) == n * worldSize,
                "NCCLComm.allGather: receive holds \(count(receive, format)) numbers, send \(n); receive must hold worldSize (\(worldSize)) times as many")
        try queue("ncclAllGather(\(n) per rank, \(format))") {
            own(send); own(receive)
            try nccl.check(nccl.allGather(pointer(send), pointer(receive), n, dataType(format), comm, stream), "ncclAllGather")
        }
    }

    /// Queues, in one group, copies of each of `root`'s buffers (raw bytes) into every rank's buffer of the same index.
    public func broadcast(_ buffers: [DeviceBuffer], root: Int = 0) throws {
        require((0..<worldSize).contains(root), "NCCLComm.broadcast: root \(root) is not in 0 ..< \(worldSize)")
        try queue("ncclBroadcast(\(buffers.count) buffers from rank \(root))") {
            for buffer in buffers {
                own(buffer)
                try nccl.check(nccl.broadcast(pointer(buffer), pointer(buffer), buffer.byteCount, 1 /* ncclUint8 */, Int32(root),
                                              comm, stream), "ncclBroadcast")
            }
        }
    }

    /// Waits until every collective queued so far has finished, polling every 100 µs. Aborts the communicator and throws an `NCCLError` naming this rank when NCCL reports
    /// an asynchronous error (a peer died, a network failure) or `timeout` seconds pass first.
    public func wait(timeout: Double) throws {
        let start = DispatchTime.now().uptimeNanoseconds
        try context.makeCurrent()
        while true {
            let state = context.driver.cuStreamQuery(stream)
            if state == 0 { return }
            if state != 600 /* CUDA_ERROR_NOT_READY */ {
                try context.driver.check(state, "rank \(rank) of \(worldSize): cuStreamQuery")
            }
            try checkAsyncError()
            if Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9 > timeout {
                abort()
                throw NCCLError(call: "rank \(rank) of \(worldSize): waiting for collectives", code: -1,
                                message: "not finished after \(timeout) s (a peer rank died or stalls); communicator aborted")
            }
            usleep(100)
        }
    }

    /// Throws (after aborting the communicator) when NCCL has recorded an asynchronous error.
    public func checkAsyncError() throws {
        lock.lock()
        let isAborted = aborted
        lock.unlock()
        guard !isAborted else {
            throw NCCLError(call: "rank \(rank) of \(worldSize)", code: -1, message: "the communicator was aborted")
        }
        var state: ncclResult_t = 0
        try nccl.check(nccl.commGetAsyncError(comm, &state), "rank \(rank) of \(worldSize): ncclCommGetAsyncError")
        if state != 0 && state != 7 /* ncclInProgress */ {
            abort()
            throw NCCLError(call: "rank \(rank) of \(worldSize): asynchronous error", code: state, message: nccl.errorString(state))
        }
    }

    /// Aborts the communicator: pending collectives are cancelled and NCCL's resources freed. Safe to call twice.
    public func abort() {
        lock.lock()
        defer { lock.unlock() }
        guard !aborted else { return }
        aborted = true
        _ = nccl.commAbort(comm)
    }

    /// Runs `body` (which queues collectives) between `ncclGroupStart` and `ncclGroupEnd`, on this
    /// context, unless the communicator was aborted.
    private func queue(_ what: @autoclosure () -> String, _ body: () throws -> Void) throws {
        try checkAsyncError()
        try context.makeCurrent()
        try context.driver.check(context.driver.cuEventRecord(computeReached, context.stream), "cuEventRecord (before a collective)")
        try context.driver.check(context.driver.cuStreamWaitEvent(stream, computeReached, 0), "cuStreamWaitEvent (before a collective)")
        try nccl.check(nccl.groupStart(), "rank \(rank) of \(worldSize): ncclGroupStart")
        var failure: Error?
        do { try body() } catch { failure = error }
        let end = nccl.groupEnd()
        if let failure { throw failure }
        try nccl.check(end, "rank \(rank) of \(worldSize): \(what()) (ncclGroupEnd)")
    }

    private func own(_ buffer: DeviceBuffer) {
        require(buffer.context === context, "NCCLComm: a buffer belongs to another CUDAContext (device \(buffer.context.ordinal), not \(context.ordinal))")
    }

    private func pointer(_ buffer: DeviceBuffer) -> UnsafeMutableRawPointer? { UnsafeMutableRawPointer(bitPattern: UInt(buffer.address)) }

    private func count(_ buffer: DeviceBuffer, _ format: NumberFormat) -> Int {
        require(buffer.byteCount % format.byteCount == 0, "NCCLComm: a buffer of \(buffer.byteCount) bytes is not whole \(format) numbers")
        return buffer.byteCount / format.byteCount
    }

    private func dataType(_ format: NumberFormat) -> ncclDataType_t { format == .float32 ? 7 : 9 }
}
