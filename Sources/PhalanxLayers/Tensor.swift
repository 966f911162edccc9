import PhalanxRuntime
import Foundation
import Synchronization

/// Float32 storage with a shape: a 64-byte aligned, row-major buffer.
///
/// A reference type on purpose: activations and parameters are large, and every copy should be
/// visible in the code (`copy()`), never implicit. The last dimension is contiguous; an
/// activation is `[batch, length, features]`, a weight `[out, in]` as in PyTorch checkpoints.
public final class Tensor: @unchecked Sendable, CustomStringConvertible {
    /// Dimensions, outermost first.
    public let shape: [Int]
    /// Elements: the product of `shape` (1 for a scalar shape `[]`).
    public let count: Int
    /// The elements; valid as long as the tensor lives.
    public let buffer: UnsafeMutableBufferPointer<Float>
    /// The tensor whose storage a view shares (kept alive by the view); nil when this one owns it.
    private let base: Tensor?

    /// A zero-filled tensor.
    public convenience init(zeros shape: [Int]) {
        self.init(uninitialized: shape)
        buffer.update(repeating: 0)
    }

    /// A tensor whose elements are arbitrary until written: for outputs that a kernel or a
    /// matrix product overwrites completely.
    public init(uninitialized shape: [Int]) {
        require(shape.allSatisfy { $0 >= 0 }, "Tensor: dimensions must be non-negative, got \(shape)")
        self.shape = shape
        count = shape.reduce(1, *)
        let raw = TensorStorage.shared.take(byteCount: max(count, 1) * 4)
        buffer = UnsafeMutableBufferPointer(start: raw.bindMemory(to: Float.self, capacity: max(count, 1)), count: count)
        base = nil
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
        buffer = UnsafeMutableBufferPointer(start: base.pointer + offset, count: count)
        self.base = base
    }


    /// A tensor holding `values` (row-major), which must number `shape`'s product.
    public convenience init(_ values: [Float], shape: [Int]) {
        self.init(zeros: shape)
        require(values.count == count, "Tensor: \(values.count) values do not fill shape \(shape) (\(count) elements)")
        _ = buffer.update(fromContentsOf: values)
    }

    deinit {
        if base == nil { TensorStorage.shared.give(UnsafeMutableRawPointer(buffer.baseAddress!), byteCount: max(count, 1) * 4) }
    }

    /// The first element, for kernels and BLAS.
    public var pointer: UnsafeMutablePointer<Float> { buffer.baseAddress! }
    /// The elements as a read-only buffer.
    public var readOnly: UnsafeBufferPointer<Float> { UnsafeBufferPointer(buffer) }
    /// A copy of the elements as an array.
    public var array: [Float] { Array(buffer) }

    /// Elements per row: the last dimension.
    public var columns: Int { shape.last ?? 1 }
    /// Rows: the product of all but the last dimension.
    public var rows: Int { columns == 0 ? 0 : count / columns }

    /// Element `i` in row-major order.
    public subscript(i: Int) -> Float {
        get { buffer[i] }
        set { buffer[i] = newValue }
    }

    /// A new tensor with its own storage holding the same shape and elements.
    public func copy() -> Tensor {
        let t = Tensor(uninitialized: shape)
        t.pointer.update(from: pointer, count: count)
        return t
    }

    /// The same elements under another shape of equal size (a copy, never a view).
    public func reshaped(_ newShape: [Int]) -> Tensor {
        require(newShape.reduce(1, *) == count, "Tensor.reshaped: \(shape) has \(count) elements, \(newShape) needs \(newShape.reduce(1, *))")
        let t = Tensor(uninitialized: newShape)
        t.pointer.update(from: pointer, count: count)
        return t
    }

    /// Sets every element to `value`.
    public func fill(_ value: Float) { buffer.update(repeating: value) }

    /// Adds `other` element-wise into this tensor.
    public func add(_ other: Tensor) {
        require(other.count == count, "Tensor.add: shapes \(shape) and \(other.shape) differ in size")
        for i in 0..<count { buffer[i] += other.buffer[i] }
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
