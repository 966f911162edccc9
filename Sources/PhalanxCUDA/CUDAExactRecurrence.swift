import PhalanxRuntime
import SWR

/// The exact linear recurrence (SWR.md sections 1 and 2) on a CUDA device, with the semantics of
/// the CPU `ExactRecurrence` from the zero state:
///
///     x_i = a_i * x_{i-1} + u_i,   x_{-1} = 0
///
/// and its gradients (SWR.md section 5):
///
///     lam_i = dx_i + a_{i+1} * lam_{i+1}   (lam_n = 0),   du_i = lam_i,   da_i = <lam_i, x_{i-1}>
///
/// computed through the hierarchical decomposition with blocks of 16: every block reduces to a
/// carrier and a compound gate in parallel, the carrier scan `S_t = c_t S_{t-1} + v_t` runs over
/// the blocks, and every block reruns from its scanned predecessor, writing each output once.
/// The carrier scan is itself an exact recurrence (gates `c`, inputs `v`), so while it is longer
/// than `scanLength` blocks it is decomposed the same way, blocks of blocks, in float32; the last
/// level is one sequential scan per (sequence, head, channel). Backward is the same in reverse
/// time, the last launch also forming `da` from the forward output. See
/// `Kernels/exact_recurrence.cu`.
///
/// Layout and storage as `CUDAJaggedWindow`: a uniform batch, values `[rows, heads, 16]`, gates
/// `[rows, heads]`, float32 or bfloat16 storage with float32 arithmetic; the carriers are float32
/// scratch of `batch * ceil(length / 16) * heads * 17` floats (and 1/16 of that per further level).
public struct CUDAExactRecurrence: Sendable {
    /// The GPU every call runs on, on its stream.
    public let context: CUDAContext
    /// How the gates, inputs, outputs and gradients store their numbers; arithmetic is float32 either way.
    public let storage: NumberFormat
    /// Threads per thread block of every launch.
    public let threadsPerBlock = 128
    /// The longest carrier scan run sequentially; longer ones are decomposed again.
    public static let scanLength = 32
    /// Positions per block of the decomposition (a tiling, not a window: the result is exact
    /// whatever it is), compiled into the kernels.
    public static let blockLength = JaggedWindow.standardBlockLength
    private typealias Kernels = (carriers: CUDAContext.Function, apply: CUDAContext.Function)
    private let kernels: Kernels, carrierKernels: Kernels, scan: CUDAContext.Function

    /// Compiles (once per context) and loads the kernels for `storage`.
    public init(context: CUDAContext, storage: NumberFormat = .float32) throws {
        self.context = context
        self.storage = storage
        let source = try KernelSources.source(named: "jagged_window") + "\n" + KernelSources.source(named: "exact_recurrence")
        let f = try context.functions(["exact_carriers_\(storage)", "exact_apply_\(storage)", "exact_carriers_f32",
                                       "exact_apply_f32", "exact_scan"], source: source, sourceName: "exact_recurrence.cu",
                                      options: KernelSources.definitions(blockLength: Self.blockLength))
        (kernels, carrierKernels, scan) = ((f[0], f[1]), (f[2], f[3]), f[4])
    }

    /// Blocks of `blockLength` covering `length` positions.
    private func blocks(_ length: Int) -> Int { (length + Self.blockLength - 1) / Self.blockLength }

    /// `output = x`, queued on the context's stream.
    ///
    /// - Parameters:
    ///   - gates: `a`, `[rows, heads]`.
    ///   - inputs: `u`, `[rows, heads, 16]`.
    ///   - output: `x`, `[rows, heads, 16]`; may not overlap `inputs`.
    public func forward(gates: DeviceBuffer, inputs: DeviceBuffer, output: DeviceBuffer, layout: SequenceLayout) throws {
        let shape = layout.checkUniformBatch("CUDAExactRecurrence.forward", context: context, storage: storage, [
            ("gates", gates, layout.gateCount), ("inputs", inputs, layout.elementCount), ("output", output, layout.elementCount),
        ])
        try run(shape, gates: gates, values: inputs, output: output, forwardOutput: output, gateGradient: output, reverse: false)
    }

    /// `inputGradient = du`, `gateGradient = da` for `outputGradient = dx`, queued; both overwritten.
    ///
    /// - Parameters:
    ///   - outputs: `x`, the forward's output.
    public func backward(gates: DeviceBuffer, outputs: DeviceBuffer, outputGradient: DeviceBuffer,
                         inputGradient: DeviceBuffer, gateGradient: DeviceBuffer, layout: SequenceLayout) throws {
        let shape = layout.checkUniformBatch("CUDAExactRecurrence.backward", context: context, storage: storage, [
            ("gates", gates, layout.gateCount), ("outputs", outputs, layout.elementCount),
            ("outputGradient", outputGradient, layout.elementCount), ("inputGradient", inputGradient, layout.elementCount),
            ("gateGradient", gateGradient, layout.gateCount),
        ])
        try run(shape, gates: gates, values: outputGradient, output: inputGradient, forwardOutput: outputs,
                gateGradient: gateGradient, reverse: true)
    }

    /// The decomposition over `values` (inputs forward, output gradients in reverse): carriers,
    /// their scan, the rerun.
    private func run(_ shape: (batch: Int, length: Int, heads: Int), gates: DeviceBuffer, values: DeviceBuffer,
                     output: DeviceBuffer, forwardOutput: DeviceBuffer, gateGradient: DeviceBuffer, reverse: Bool) throws {
        guard shape.batch > 0 && shape.length > 0 else { return }
        let (carriers, compounds) = try reduce(kernels.carriers, shape, gates: gates, values: values, reverse: reverse)
        try scanCarriers(carriers, compounds: compounds, (shape.batch, blocks(shape.length), shape.heads))
        try launch(kernels.apply, shape, [.buffer(gates), .buffer(values), .buffer(carriers), .buffer(output),
                                          .buffer(forwardOutput), .buffer(gateGradient)], reverse: reverse)
    }

    /// Each block's carrier `[batch, blocks, heads, 16]` and compound gate `[batch, blocks, heads]`
    /// (float32).
    private func reduce(_ kernel: CUDAContext.Function, _ shape: (batch: Int, length: Int, heads: Int),
                        gates: DeviceBuffer, values: DeviceBuffer, reverse: Bool) throws -> (DeviceBuffer, DeviceBuffer) {
        let blocks = blocks(shape.length)
        let carriers = try DeviceBuffer(context: context, byteCount: shape.batch * blocks * shape.heads * JaggedWindow.standardHeadDim * 4)
        let compounds = try DeviceBuffer(context: context, byteCount: shape.batch * blocks * shape.heads * 4)
        try launch(kernel, shape, [.buffer(gates), .buffer(values), .buffer(carriers), .buffer(compounds)], reverse: reverse)
        return (carriers, compounds)
    }

    /// `S_t = c_t S_{t-1} + v_t` in place over `shape.length` blocks: sequentially when short,
    /// else as an exact recurrence of its own (carriers of blocks of carriers, their scan, rerun
    /// in place: each thread reads its element before writing it).
    private func scanCarriers(_ carriers: DeviceBuffer, compounds: DeviceBuffer,
                              _ shape: (batch: Int, length: Int, heads: Int)) throws {
        if shape.length <= Self.scanLength {
            let threads = shape.batch * shape.heads * JaggedWindow.standardHeadDim
            try context.launch(scan, grid: ((threads + threadsPerBlock - 1) / threadsPerBlock, 1, 1), block: (threadsPerBlock, 1, 1),
                               arguments: [.buffer(carriers), .buffer(compounds), .int32(Int32(shape.batch)),
                                           .int32(Int32(shape.length)), .int32(Int32(shape.heads))])
            return
        }
        let (upper, upperCompounds) = try reduce(carrierKernels.carriers, shape, gates: compounds, values: carriers, reverse: false)
        try scanCarriers(upper, compounds: upperCompounds, (shape.batch, blocks(shape.length), shape.heads))
        try launch(carrierKernels.apply, shape, [.buffer(compounds), .buffer(carriers), .buffer(upper), .buffer(carriers),
                                                 .buffer(carriers), .buffer(carriers)], reverse: false)
    }

    /// A launch of one thread per (sequence, block, head, 4 channels).
    private func launch(_ kernel: CUDAContext.Function, _ shape: (batch: Int, length: Int, heads: Int),
                        _ buffers: [CUDAContext.Argument], reverse: Bool) throws {
        let threads = shape.batch * (blocks(shape.length)) * shape.heads * 4
        try context.launch(kernel, grid: ((threads + threadsPerBlock - 1) / threadsPerBlock, 1, 1), block: (threadsPerBlock, 1, 1),
                           arguments: buffers + [.int32(Int32(shape.batch)), .int32(Int32(shape.length)),
                                                 .int32(Int32(shape.heads)), .int32(reverse ? 1 : 0)])
    }
}
