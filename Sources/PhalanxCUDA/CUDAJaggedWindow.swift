import PhalanxRuntime
import SWR

/// The jagged-window sliding window recurrence (SWR.md sections 3 and 5) on a CUDA device, with
/// exactly the semantics of the CPU `JaggedWindow` from a fresh state:
///
///     w_i = a_i * w_{i-1} + u_i,   g_i = a_i * g_{i-1}   (restarting from 0 and 1 at each block)
///     y_i = w_i + g_i * v_{t-1}    (k = 2; v_{t-1} the previous block's terminal w, 0 for block 0)
///     y_i = w_i                    (k = 1)
///
/// at every block boundary and for any length (a partial last block simply ends), and its
/// gradients `du`, `da` given `dy`.
///
/// Layout: a uniform batch (`SequenceLayout.batched`), inputs, outputs and their gradients
/// `[batch * length, heads, 16]`, gates and their gradient `[batch * length, heads]`, row-major.
/// Storage is float32 or bfloat16 for every buffer; arithmetic is float32 either way, so bfloat16
/// results are the float32 ones rounded once.
///
/// Requirements: head dim 16 and a block length in `blockLengths` (both compiled into the kernels,
/// `KernelSources.definitions`). Every call starts from the empty state (`JaggedState(for:)`):
/// there is no state in or out, and no initial-state gradient.
///
/// Work: one GPU thread per (sequence, head, 4 channels, chunk of `tuning.chunkBlocks` blocks);
/// chunks recompute one neighbouring block (a halo) instead of communicating, so the forward reads
/// gates and inputs and writes outputs once, plus `1 / chunkBlocks` of a re-read. See
/// `Kernels/jagged_window.cu`.
public struct CUDAJaggedWindow: Sendable {
    /// How the work is cut into GPU threads: changes speed, never results (up to the order of the
    /// gate gradient's 16-channel sum). The defaults were measured fastest on an H200 at dim 2048
    /// and 32K tokens (`phalanx bench cuda` sweeps the alternatives).
    public struct Tuning: Hashable, Sendable, CustomStringConvertible {
        /// Blocks of `blockLength` positions per thread. nil: the fewest chunks that still give one
        /// thread to every slot of one full wave of the device (resident threads per
        /// multiprocessor, from the kernel's registers, times multiprocessors): the least halo
        /// re-reading that keeps the whole device busy.
        public var chunkBlocks: Int?
        /// Threads per thread block, a multiple of 32. 128 rather than 256: with the backward
        /// kernel's many registers, smaller blocks pack more threads on a multiprocessor (bfloat16:
        /// three blocks of 128, 384 threads, against one of 256).
        public var threadsPerBlock: Int
        /// Channels per thread of the backward kernel: 4, or 2 (twice the threads, fewer registers
        /// each). The forward kernel always takes 4.
        public var backwardChannels: Int

        /// A split with the given chunk length (nil: automatic), block size and backward channels;
        /// checked when assigned to `tuning`.
        public init(chunkBlocks: Int? = nil, threadsPerBlock: Int = 128, backwardChannels: Int = 4) {
            self.chunkBlocks = chunkBlocks
            self.threadsPerBlock = threadsPerBlock
            self.backwardChannels = backwardChannels
        }

        /// Every kernel variant, with the automatic chunk length and the default block size.
        public static var variants: [Tuning] { [Tuning(backwardChannels: 4), Tuning(backwardChannels: 2)] }

        /// The backward variant, chunk length and threads per block, for reports.
        public var description: String {
            "bwd v\(backwardChannels) chunk \(chunkBlocks.map(String.init) ?? "auto") tpb \(threadsPerBlock)"
        }
    }

    /// The GPU every call runs on, on its stream.
    public let context: CUDAContext
    /// Block length and blocks seen; the block length must lie in `blockLengths`.
    public let window: JaggedWindow
    /// How every buffer of a call stores its numbers; arithmetic is float32 either way.
    public let storage: NumberFormat
    /// The kernel variant and work split (see `Tuning`).
    public var tuning = Tuning() {
        didSet {
            require(tuning.threadsPerBlock >= 32 && tuning.threadsPerBlock <= 1024 && tuning.threadsPerBlock % 32 == 0,
                    "CUDAJaggedWindow: threadsPerBlock must be a multiple of 32 up to 1024, got \(tuning.threadsPerBlock)")
            require((tuning.chunkBlocks ?? 1) >= 1, "CUDAJaggedWindow: chunkBlocks must be at least 1, got \(tuning.chunkBlocks!)")
            for name in [forwardKernelName, backwardKernelName] {
                require(kernels[name] != nil,
                        "CUDAJaggedWindow: no kernel \(name) for \(tuning); available: \(kernels.keys.sorted().joined(separator: ", "))")
            }
        }
    }

    private let kernels: [String: CUDAContext.Function]
    private var kernelType: String { storage == .float32 ? "f32" : "bf16" }
    private var forwardKernelName: String { "swr_jagged_forward_\(kernelType)_v4" }
    private var backwardKernelName: String { "swr_jagged_backward_\(kernelType)_v\(tuning.backwardChannels)" }

    /// The block lengths the kernels compile for: a whole block lives in registers.
    public static let blockLengths = 1...16

    /// Compiles (once per context, then from its cache) and loads the kernels for `storage`.
    ///
    /// - Throws: `CUDAUnavailable` without NVRTC or the kernel sources, `NVRTCError`, `CUDAError`.
    public init(context: CUDAContext, window: JaggedWindow = JaggedWindow(), storage: NumberFormat = .float32) throws {
        require(Self.blockLengths.contains(window.blockLength),
                "CUDAJaggedWindow: the kernels take block lengths \(Self.blockLengths), the window has \(window.blockLength)")
        self.context = context
        self.window = window
        self.storage = storage
        let type = storage == .float32 ? "f32" : "bf16"
        let names = ["swr_jagged_forward_\(type)_v4"] + Tuning.variants.map { "swr_jagged_backward_\(type)_v\($0.backwardChannels)" }
        let functions = try context.functions(names, source: try KernelSources.source(named: "jagged_window"),
                                              sourceName: "jagged_window.cu",
                                              options: KernelSources.definitions(blockLength: window.blockLength))
        kernels = Dictionary(uniqueKeysWithValues: zip(names, functions))
    }

    // MARK: Device buffers

    /// `output = SWR(gates, inputs)`, queued on the context's stream.
    ///
    /// - Parameters:
    ///   - gates: `a`, `[rows, heads]` in `storage`.
    ///   - inputs: `u`, `[rows, heads, 16]`.
    ///   - output: `y`, `[rows, heads, 16]`; may not overlap `inputs`.
    ///   - layout: a uniform batch with head dim 16.
    public func forward(gates: DeviceBuffer, inputs: DeviceBuffer, output: DeviceBuffer,
                        layout: SequenceLayout) throws {
        let shape = check(layout, "forward", ("gates", gates, layout.gateCount), ("inputs", inputs, layout.elementCount),
                          ("output", output, layout.elementCount))
        guard shape.batch > 0 && shape.length > 0 else { return }
        let kernel = kernels[forwardKernelName]!
        let (chunk, grid) = try plan(shape, kernel: kernel, channels: 4)
        try context.launch(kernel, grid: (grid, 1, 1), block: (tuning.threadsPerBlock, 1, 1), arguments: [
            .buffer(gates), .buffer(inputs), .buffer(output), .int32(Int32(shape.batch)), .int32(Int32(shape.length)),
            .int32(Int32(layout.heads)), .int32(Int32(chunk)), .int32(window.blocksSeen == 2 ? 1 : 0),
        ])
    }

    /// `inputGradient = du`, `gateGradient = da` for the output gradient `dy` (SWR.md section 5),
    /// queued on the context's stream. Both are overwritten.
    ///
    /// - Parameters:
    ///   - gates, inputs: as given to `forward`.
    ///   - outputGradient: `dy`, `[rows, heads, 16]`.
    ///   - inputGradient: `du`, `[rows, heads, 16]`.
    ///   - gateGradient: `da`, `[rows, heads]`.
    public func backward(gates: DeviceBuffer, inputs: DeviceBuffer, outputGradient: DeviceBuffer,
                         inputGradient: DeviceBuffer, gateGradient: DeviceBuffer, layout: SequenceLayout) throws {
        let shape = check(layout, "backward", ("gates", gates, layout.gateCount), ("inputs", inputs, layout.elementCount),
                          ("outputGradient", outputGradient, layout.elementCount),
                          ("inputGradient", inputGradient, layout.elementCount),
                          ("gateGradient", gateGradient, layout.gateCount))
        guard shape.batch > 0 && shape.length > 0 else { return }
        let kernel = kernels[backwardKernelName]!
        let (chunk, grid) = try plan(shape, kernel: kernel, channels: tuning.backwardChannels)
        try context.launch(kernel, grid: (grid, 1, 1), block: (tuning.threadsPerBlock, 1, 1), arguments: [
            .buffer(gates), .buffer(inputs), .buffer(outputGradient), .buffer(inputGradient), .buffer(gateGradient),
            .int32(Int32(shape.batch)), .int32(Int32(shape.length)), .int32(Int32(layout.heads)), .int32(Int32(chunk)),
            .int32(window.blocksSeen == 2 ? 1 : 0),
        ])
    }

    /// The chunk length in blocks that `forward` (or `backward`) uses for `layout`.
    public func chunkBlocks(for layout: SequenceLayout, backward: Bool) throws -> Int {
        try plan((layout.sequenceCount, layout.lengths.first ?? 0, layout.heads),
                 kernel: kernels[backward ? backwardKernelName : forwardKernelName]!,
                 channels: backward ? tuning.backwardChannels : 4).chunkBlocks
    }

    /// The chunk length in blocks and the number of thread blocks for `kernel` with `channels`
    /// channels per thread.
    func plan(_ shape: (batch: Int, length: Int, heads: Int), kernel: CUDAContext.Function,
              channels: Int) throws -> (chunkBlocks: Int, grid: Int) {
        let resident = tuning.chunkBlocks == nil ? try context.residentBlocks(kernel, threadsPerBlock: tuning.threadsPerBlock) : 0
        let plan = ChunkPlan(batch: shape.batch, length: shape.length, blockLength: window.blockLength,
                             lanesPerRow: shape.heads * (JaggedWindow.standardHeadDim / channels),
                             threadsPerBlock: tuning.threadsPerBlock, chunkBlocks: tuning.chunkBlocks,
                             residentThreads: resident * tuning.threadsPerBlock * context.multiprocessorCount)
        return (plan.chunkBlocks, plan.gridBlocks)
    }

    /// Stops with a message on a layout or buffer the kernels cannot take; returns the batch shape.
    private func check(_ layout: SequenceLayout, _ function: String,
                       _ buffers: (String, DeviceBuffer, Int)...) -> (batch: Int, length: Int, heads: Int) {
        layout.checkUniformBatch("CUDAJaggedWindow.\(function)", context: context, storage: storage, buffers)
    }

    // MARK: Host arrays

    /// `forward` on host arrays: converts to `storage` (rounding to bfloat16 if so), copies in,
    /// runs, copies the output back as float32.
    public func forward(gates: [Float], inputs: [Float], layout: SequenceLayout) throws -> [Float] {
        let a = try upload(gates), u = try upload(inputs)
        let y = try DeviceBuffer(context: context, byteCount: inputs.count * storage.byteCount)
        try forward(gates: a, inputs: u, output: y, layout: layout)
        return try download(y, count: inputs.count)
    }

    /// `backward` on host arrays (see the host `forward`).
    public func backward(gates: [Float], inputs: [Float], outputGradient: [Float],
                         layout: SequenceLayout) throws -> (inputGradient: [Float], gateGradient: [Float]) {
        let a = try upload(gates), u = try upload(inputs), dy = try upload(outputGradient)
        let du = try DeviceBuffer(context: context, byteCount: inputs.count * storage.byteCount)
        let da = try DeviceBuffer(context: context, byteCount: gates.count * storage.byteCount)
        try backward(gates: a, inputs: u, outputGradient: dy, inputGradient: du, gateGradient: da, layout: layout)
        return (try download(du, count: inputs.count), try download(da, count: gates.count))
    }

    /// A device buffer holding `values` in `storage`.
    public func upload(_ values: [Float]) throws -> DeviceBuffer { try storage.upload(values, context: context) }

    /// The first `count` numbers of `buffer` in `storage`, as float32.
    public func download(_ buffer: DeviceBuffer, count: Int) throws -> [Float] { try storage.download(buffer, count: count) }
}
