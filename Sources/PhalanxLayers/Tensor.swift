import PhalanxRuntime
import PhalanxCUDA
import Foundation
import Synchronization

/// Where a tensor's numbers live: host memory, or a CUDA device. Layers run where their input
/// lives; every tensor of one call must live in the same place (a mismatch stops with both named).
public enum Device: CustomStringConvertible, Sendable {
    case cpu
    case cuda(CUDADevice)

    /// The CUDA device, or nil on the CPU.
    public var cuda: CUDADevice? {
        if case .cuda(let device) = self { return device }
        return nil
    }

    /// Whether both are the CPU or both the same GPU.
    public func isSame(as other: Device) -> Bool {
        switch (self, other) {
        case (.cpu, .cpu): return true
        case (.cuda(let a), .cuda(let b)): return a === b
        default: return false
        }
    }

    /// `cpu`, or `cuda:0 (NVIDIA H200)`.
    public var description: String {
        switch self {
        case .cpu: "cpu"
        case .cuda(let device): device.description
        }
    }
}

/// Where a model runs and in which format its activations and matrix products are: the CPU
/// (float32), or a GPU in float32 (exact mode, for checks) or bfloat16 mixed precision (bfloat16
/// activations and compute copies of the matrices; float32 master weights, gradients, optimizer
/// moments and accumulation).
public struct Placement: Sendable, CustomStringConvertible {
    /// The device.
    public var device: Device
    /// The activations' and matrix products' format (float32 on the CPU).
    public var compute: NumberFormat

    /// `compute` on `device`; the CPU computes in float32 whatever is asked.
    public init(_ device: Device, compute: NumberFormat = .float32) {
        self.device = device
        self.compute = device.cuda == nil ? .float32 : compute
    }

    /// The CPU, float32.
    public static let cpu = Placement(.cpu)

    /// `cpu`, or `cuda:0 (NVIDIA H200) bf16`.
    public var description: String { device.cuda == nil ? "cpu" : "\(device) \(compute)" }
}

/// Numbers with a shape, in host memory (float32, 64-byte aligned) or on a CUDA device (float32
/// or bfloat16), row-major.
///
/// A reference type on purpose: activations and parameters are large, and every copy should be
/// visible in the code (`copy()`), never implicit. The last dimension is contiguous; an
/// activation is `[batch, length, features]`, a weight `[out, in]` as in PyTorch checkpoints.
///
/// Host code reads and writes through `pointer`/`buffer` (host tensors only); device code passes
/// `deviceBuffer` to kernels. `array` reads either. A tensor that owns its storage can `move` to
/// the other place (a model moves its parameters); views follow the tensor they view.
///
/// Mixed precision: a tensor may carry a `computeCopy`, the same numbers in a narrower format
/// (bfloat16 weights for the matrix products while the float32 master stays for the optimizer);
/// `compute` is that copy when there is one, else the tensor itself.
public final class Tensor: @unchecked Sendable, CustomStringConvertible {
    /// Dimensions, outermost first.
    public let shape: [Int]
    /// Elements: the product of `shape` (1 for a scalar shape `[]`).
    public let count: Int

    private enum Storage {
        case host(UnsafeMutableBufferPointer<Float>)
        /// The buffer is nil when the allocation failed (recorded on the device; no kernel runs after it).
        case device(CUDADevice, DeviceBuffer?, NumberFormat)
        /// `count` elements of `base` from element `offset`.
        case view(Tensor, offset: Int)
    }
    private var storage: Storage
    /// The narrower copy of an owning tensor (see the type's summary).
    public var computeCopy: Tensor? {
        didSet {
            if case .view = storage { require(computeCopy == nil, "Tensor.computeCopy: set it on the tensor a view views") }
            if let copy = computeCopy { require(copy.shape == shape, "Tensor.computeCopy: shape \(copy.shape), expected \(shape)") }
        }
    }

    /// A zero-filled host tensor.
    public convenience init(zeros shape: [Int]) {
        self.init(uninitialized: shape)
        buffer.update(repeating: 0)
    }

    /// A host tensor whose elements are arbitrary until written: for outputs that a kernel or a
    /// matrix product overwrites completely.
    public init(uninitialized shape: [Int]) {
        require(shape.allSatisfy { $0 >= 0 }, "Tensor: dimensions must be non-negative, got \(shape)")
        self.shape = shape
        count = shape.reduce(1, *)
        storage = .host(Self.hostBuffer(count))
    }

    /// A tensor on `device` whose elements are arbitrary until written, stored in `format` on a
    /// GPU (host tensors are float32 whatever `format` says). A failed device allocation is
    /// recorded on the device (see `CUDADevice.perform`).
    public init(uninitialized shape: [Int], on device: Device, format: NumberFormat = .float32) {
        require(shape.allSatisfy { $0 >= 0 }, "Tensor: dimensions must be non-negative, got \(shape)")
        self.shape = shape
        count = shape.reduce(1, *)
        switch device {
        case .cpu: storage = .host(Self.hostBuffer(count))
        case .cuda(let gpu):
            let bytes = count * format.byteCount
            storage = .device(gpu, gpu.value { try DeviceBuffer(context: gpu.context, byteCount: bytes) }, format)
        }
    }

    /// A zero-filled tensor on `device` in `format`.
    public convenience init(zeros shape: [Int], on device: Device, format: NumberFormat = .float32) {
        self.init(uninitialized: shape, on: device, format: format)
        fill(0)
    }

    /// An uninitialised tensor of `shape` where `other` lives, in its format.
    public convenience init(uninitialized shape: [Int], like other: Tensor) {
        self.init(uninitialized: shape, on: other.device, format: other.format)
    }

    /// A view of `count(shape)` contiguous elements of `base` starting at `offset`: writes through
    /// either are seen by both. Layers use views to keep several parameters in one matrix (one
    /// matrix product instead of several) while each keeps its own checkpoint name.
    public init(viewing base: Tensor, offset: Int, shape: [Int]) {
        let count = shape.reduce(1, *)
        require(offset >= 0 && offset + count <= base.count,
                "Tensor view: \(shape) at offset \(offset) does not fit in \(base.shape)")
        self.shape = shape
        self.count = count
        if case .view(let root, let rootOffset) = base.storage {
            storage = .view(root, offset: rootOffset + offset)
        } else {
            storage = .view(base, offset: offset)
        }
    }

    /// A host tensor holding `values` (row-major), which must number `shape`'s product.
    public convenience init(_ values: [Float], shape: [Int]) {
        self.init(zeros: shape)
        require(values.count == count, "Tensor: \(values.count) values do not fill shape \(shape) (\(count) elements)")
        _ = buffer.update(fromContentsOf: values)
    }

    /// A tensor on `device` in `format` holding `values` (rounded once to bfloat16 when so stored).
    public convenience init(_ values: [Float], shape: [Int], on device: Device, format: NumberFormat = .float32) {
        self.init(uninitialized: shape, on: device, format: format)
        write(values)
    }

    deinit {
        if case .host(let buffer) = storage {
            TensorStorage.shared.give(UnsafeMutableRawPointer(buffer.baseAddress!), byteCount: max(count, 1) * 4)
        }
    }

    private static func hostBuffer(_ count: Int) -> UnsafeMutableBufferPointer<Float> {
        let raw = TensorStorage.shared.take(byteCount: max(count, 1) * 4)
        return UnsafeMutableBufferPointer(start: raw.bindMemory(to: Float.self, capacity: max(count, 1)), count: count)
    }

    /// Where the numbers live.
    public var device: Device {
        switch storage {
        case .host: .cpu
        case .device(let gpu, _, _): .cuda(gpu)
        case .view(let base, _): base.device
        }
    }

    /// How the numbers are stored: float32 on the host; float32 or bfloat16 on a device.
    public var format: NumberFormat {
        switch storage {
        case .host: .float32
        case .device(_, _, let format): format
        case .view(let base, _): base.format
        }
    }

    /// The elements of a host tensor (stops with a message for a device tensor: use `array`).
    public var buffer: UnsafeMutableBufferPointer<Float> {
        switch storage {
        case .host(let buffer): return buffer
        case .view(let base, let offset): return UnsafeMutableBufferPointer(start: base.buffer.baseAddress! + offset, count: count)
        case .device: fatalError("Tensor\(shape) lives on \(device): no host pointer (read it with `array`, or move it)")
        }
    }

    /// The device memory of a device tensor: a view of the base's memory for a view (stops with a
    /// message for a host tensor).
    public var deviceBuffer: DeviceBuffer {
        switch storage {
        case .device(_, let buffer, _):
            guard let buffer else { fatalError("Tensor\(shape): its device allocation failed (see CUDADevice.failure)") }
            return buffer
        case .view(let base, let offset):
            let bytes = format.byteCount
            return DeviceBuffer(viewing: base.deviceBuffer, byteOffset: offset * bytes, byteCount: count * bytes)
        case .host: fatalError("Tensor\(shape) lives on the CPU: no device buffer")
        }
    }

    /// The tensor that owns the storage: this one, or the one a view views.
    public var root: Tensor {
        if case .view(let base, _) = storage { return base }
        return self
    }

    /// The tensor's numbers in `compute` format: `computeCopy` (or the view of the base's copy)
    /// when there is one, else the tensor itself.
    public var compute: Tensor {
        switch storage {
        case .view(let base, let offset):
            guard let copy = base.computeCopy else { return self }
            return Tensor(viewing: copy, offset: offset, shape: shape)
        default: return computeCopy ?? self
        }
    }

    /// Moves an owning tensor's numbers to `device` in `format` (float32 on the CPU): views of it
    /// follow. A bfloat16 copy rounds each number once. Waits for the device when leaving it.
    /// With `compute` (a GPU only), also sets a `computeCopy` in that format from the same numbers;
    /// without, drops any.
    public func move(to device: Device, format: NumberFormat = .float32, compute: NumberFormat? = nil) {
        if case .view = storage { fatalError("Tensor.move: move the tensor this view views") }
        let values = array
        if case .host(let old) = storage {
            TensorStorage.shared.give(UnsafeMutableRawPointer(old.baseAddress!), byteCount: max(count, 1) * 4)
        }
        computeCopy = nil
        switch device {
        case .cpu:
            let buffer = Self.hostBuffer(count)
            _ = buffer.update(fromContentsOf: values)
            storage = .host(buffer)
        case .cuda(let gpu):
            storage = .device(gpu, gpu.value { try format.upload(values, context: gpu.context) }, format)
            if let compute {
                computeCopy = Tensor(values, shape: shape, on: device, format: compute)
            }
        }
    }

    /// The first element of a host tensor, for kernels and BLAS.
    public var pointer: UnsafeMutablePointer<Float> { buffer.baseAddress! }
    /// The elements of a host tensor as a read-only buffer.
    public var readOnly: UnsafeBufferPointer<Float> { UnsafeBufferPointer(buffer) }
    /// A copy of the elements as float32 values, from either place (a device read waits for its
    /// stream; after a device failure, zeros).
    public var array: [Float] {
        switch device {
        case .cpu: return Array(buffer)
        case .cuda(let gpu):
            return gpu.value { try format.download(deviceBuffer, count: count) } ?? [Float](repeating: 0, count: count)
        }
    }

    /// Overwrites the elements with `values` (row-major, `count` of them), in this tensor's
    /// place and format (rounded once to bfloat16 when it stores bfloat16). A device write
    /// waits for the stream.
    public func write(_ values: [Float]) {
        require(values.count == count, "Tensor.write: \(values.count) values for \(shape) (\(count) elements)")
        switch device {
        case .cpu: _ = buffer.update(fromContentsOf: values)
        case .cuda(let gpu): gpu.perform { try format.write(values, to: deviceBuffer) }
        }
    }

    /// Elements per row: the last dimension.
    public var columns: Int { shape.last ?? 1 }
    /// Rows: the product of all but the last dimension.
    public var rows: Int { columns == 0 ? 0 : count / columns }

    /// Element `i` in row-major order (host tensors).
    public subscript(i: Int) -> Float {
        get { buffer[i] }
        set { buffer[i] = newValue }
    }

    /// A new tensor with its own storage holding the same shape and elements, where this one lives.
    public func copy() -> Tensor { reshaped(shape) }

    /// The same elements under another shape of equal size (a copy, never a view).
    public func reshaped(_ newShape: [Int]) -> Tensor {
        require(newShape.reduce(1, *) == count, "Tensor.reshaped: \(shape) has \(count) elements, \(newShape) needs \(newShape.reduce(1, *))")
        let t = Tensor(uninitialized: newShape, like: self)
        switch device {
        case .cpu: t.pointer.update(from: pointer, count: count)
        case .cuda(let gpu): gpu.perform { try t.deviceBuffer.copy(from: deviceBuffer) }
        }
        return t
    }

    /// Sets every element to `value` (on a device: 0 only, the one value a gradient is reset to).
    public func fill(_ value: Float) {
        switch device {
        case .cpu: buffer.update(repeating: value)
        case .cuda(let gpu):
            require(value == 0, "Tensor.fill(\(value)) on \(gpu): device tensors fill with 0 only")
            gpu.perform { try deviceBuffer.fill(byte: 0) }
        }
    }

    /// Adds `other` element-wise into this tensor.
    public func add(_ other: Tensor) {
        require(other.count == count, "Tensor.add: shapes \(shape) and \(other.shape) differ in size")
        requireSameDevice("Tensor.add", other)
        switch device {
        case .cpu:
            // The pointers once, outside the loop: `buffer` is a switch over the storage (and a
            // retain) per access, which kept this loop scalar at 6% of a training step.
            let target = buffer, source = other.buffer
            for i in 0..<count { target[i] += source[i] }
        case .cuda(let gpu): DeviceOps.add(other, into: self, on: gpu)
        }
    }

    /// Stops with a message naming `operation` unless every tensor of `others` lives where this one does.
    public func requireSameDevice(_ operation: String, _ others: Tensor...) {
        for other in others {
            require(other.device.isSame(as: device), "\(operation): tensors on \(device) and \(other.device)")
        }
    }

    /// `Tensor[shape]`, without the elements.
    public var description: String { "Tensor\(shape)" }
}

/// Recycles tensor memory by size class.
///
/// A training or decoding step allocates and frees the same activation shapes every time. Fresh
/// large allocations come from `mmap`, so each step would pay page faults and the kernel's page
/// zeroing (measured: a quarter of a training step). Freed blocks wait here for the next tensor
/// of their size class; at most `limit` bytes are kept, beyond which blocks go back to the system.
///
/// Size classes (`sizeClass`) are four per doubling, so a block is at most 25% larger than asked:
/// decoding asks for a slightly larger buffer at every step (one more cached position), and with
/// exact sizes none would ever be reused while the cache filled to its limit.
final class TensorStorage: Sendable {
    /// Keeps up to a quarter of physical memory: a 32K-token training step's activations exceed
    /// 4 GiB, and any limit below the live set of one step sends blocks back to the system (and
    /// brings their page faults back) every step.
    static let shared = TensorStorage(limit: Int(ProcessInfo.processInfo.physicalMemory / 4))

    private struct Cache {
        /// Addresses of free blocks (as integers: the cache holds no pointers across threads).
        var blocks: [Int: [UInt]] = [:]
        var bytes = 0
    }
    private let cache = Mutex(Cache())
    private let limit: Int

    init(limit: Int) { self.limit = limit }

    /// The bytes actually allocated for a request of `byteCount`: a multiple of 64 up to 4 KiB,
    /// above that the next multiple of a quarter of the largest power of two not above it
    /// (4 KiB, 5 KiB, 6 KiB, 7 KiB, 8 KiB, 10 KiB, ...).
    static func sizeClass(_ byteCount: Int) -> Int {
        guard byteCount > 4096 else { return (byteCount + 63) & ~63 }
        let step = (1 << (Int.bitWidth - 1 - byteCount.leadingZeroBitCount)) / 4
        return (byteCount + step - 1) / step * step
    }

    /// A 64-byte aligned block of at least `byteCount` bytes (contents arbitrary).
    func take(byteCount requested: Int) -> UnsafeMutableRawPointer {
        let byteCount = Self.sizeClass(requested)
        let recycled = cache.withLock { c -> UInt? in
            guard let block = c.blocks[byteCount]?.popLast() else { return nil }
            c.bytes -= byteCount
            return block
        }
        return recycled.flatMap { UnsafeMutableRawPointer(bitPattern: $0) }
            ?? UnsafeMutableRawPointer.allocate(byteCount: byteCount, alignment: 64)
    }

    /// Returns a block taken with `take(byteCount:)`.
    func give(_ block: UnsafeMutableRawPointer, byteCount requested: Int) {
        let byteCount = Self.sizeClass(requested)
        let address = UInt(bitPattern: block)
        let kept = cache.withLock { c -> Bool in
            guard c.bytes + byteCount <= limit else { return false }
            c.blocks[byteCount, default: []].append(address)
            c.bytes += byteCount
            return true
        }
        if !kept { block.deallocate() }
    }
}
