import PhalanxRuntime

/// Memory on the GPU (`cuMemAlloc`), handed back to its context's cache of allocations when the
/// last reference goes away (`CUDAContext.releaseCachedMemory()` frees those).
///
/// Untyped bytes: float32 data is copied in and out as `[Float]`, bfloat16 data as `[UInt16]`
/// (raw bits; `BFloat16` converts). The address is aligned to at least 256 bytes, which the vector
/// loads of the kernels need.
public final class DeviceBuffer: @unchecked Sendable {
    /// The context whose memory this is; every copy runs on its stream.
    public let context: CUDAContext
    /// The `CUdeviceptr`.
    public let address: UInt64
    /// Size in bytes, as asked for.
    public let byteCount: Int
    /// The buffer whose memory a view shares (kept alive by the view); nil when this one owns it.
    public let base: DeviceBuffer?

    /// Allocates `byteCount` bytes (contents undefined).
    public init(context: CUDAContext, byteCount: Int) throws {
        require(byteCount >= 0, "DeviceBuffer: byteCount must be non-negative, got \(byteCount)")
        self.context = context
        self.byteCount = byteCount
        try context.makeCurrent()
        self.address = try context.allocate(byteCount)
        base = nil
    }

    /// A view of `byteCount` bytes of `base` from `byteOffset`: kernels and copies see the same
    /// memory through either; the memory goes back when both are gone.
    public init(viewing base: DeviceBuffer, byteOffset: Int, byteCount: Int) {
        require(byteOffset >= 0 && byteCount >= 0 && byteOffset + byteCount <= base.byteCount,
                "DeviceBuffer view: \(byteCount) bytes at \(byteOffset) do not fit in a buffer of \(base.byteCount)")
        context = base.context
        address = base.address + UInt64(byteOffset)
        self.byteCount = byteCount
        self.base = base.base ?? base
    }

    /// A buffer holding `values` (float32).
    public convenience init(context: CUDAContext, floats values: [Float]) throws {
        try self.init(context: context, byteCount: values.count * 4)
        try upload(values)
    }

    /// A buffer holding `bits` (bfloat16).
    public convenience init(context: CUDAContext, bfloat16 bits: [UInt16]) throws {
        try self.init(context: context, byteCount: bits.count * 2)
        try upload(bits)
    }

    deinit { if base == nil { context.memory.give(address, byteCount: max(byteCount, 1)) } }

    /// Copies `values` to the start of the buffer, after the stream's queued work; returns when
    /// they have landed.
    public func upload<T: BitwiseCopyable>(_ values: [T]) throws {
        guard try queueCopy(of: values, "DeviceBuffer.upload") else { return }
        try context.synchronize()
    }

    /// Queues a copy of `values` to the start of the buffer, in stream order, without waiting: the
    /// driver stages pageable host memory before it returns, so `values` may change afterwards.
    /// For what the host sends while the device works (a step's tokens and targets, a decode
    /// step's positions), where `upload`'s wait would drain the queue each time.
    public func enqueueUpload<T: BitwiseCopyable>(_ values: [T]) throws {
        try queueCopy(of: values, "DeviceBuffer.enqueueUpload")
    }

    /// Queues the host-to-device copy of `upload` and `enqueueUpload`; false when there is nothing
    /// to copy.
    @discardableResult
    private func queueCopy<T: BitwiseCopyable>(of values: [T], _ name: String) throws -> Bool {
        let bytes = values.count * MemoryLayout<T>.stride
        require(bytes <= byteCount, "\(name): \(bytes) bytes do not fit in a buffer of \(byteCount)")
        guard bytes > 0 else { return false }
        try context.makeCurrent()
        try values.withUnsafeBytes { source in
            try context.driver.check(context.driver.cuMemcpyHtoDAsync(address, source.baseAddress!, bytes, context.stream),
                                     "cuMemcpyHtoDAsync_v2(\(bytes) bytes)")
        }
        return true
    }

    /// The first `count` values of type `T` (all that fit when nil), after the stream's queued work.
    public func download<T: BitwiseCopyable>(_ type: T.Type, count: Int? = nil) throws -> [T] {
        let count = count ?? byteCount / MemoryLayout<T>.stride
        let bytes = count * MemoryLayout<T>.stride
        require(count >= 0 && bytes <= byteCount,
                "DeviceBuffer.download: \(count) values of \(T.self) (\(bytes) bytes) exceed the buffer's \(byteCount)")
        try context.synchronize()
        return try [T](unsafeUninitializedCapacity: count) { values, initialized in
            if bytes > 0 {
                try context.driver.check(context.driver.cuMemcpyDtoH(UnsafeMutableRawPointer(values.baseAddress!), address, bytes),
                                         "cuMemcpyDtoH_v2(\(bytes) bytes)")
            }
            initialized = count
        }
    }

    /// The buffer as float32 values.
    public func floats(count: Int? = nil) throws -> [Float] { try download(Float.self, count: count) }

    /// The buffer as bfloat16 bits.
    public func bfloat16(count: Int? = nil) throws -> [UInt16] { try download(UInt16.self, count: count) }

    /// Queues a copy of `byteCount` bytes (all of `source` when nil) from `source` into this buffer.
    public func copy(from source: DeviceBuffer, byteCount: Int? = nil) throws {
        let bytes = byteCount ?? source.byteCount
        require(bytes <= source.byteCount && bytes <= self.byteCount,
                "DeviceBuffer.copy: \(bytes) bytes from a buffer of \(source.byteCount) into one of \(self.byteCount)")
        try context.makeCurrent()
        try context.driver.check(context.driver.cuMemcpyDtoDAsync(address, source.address, bytes, context.stream),
                                 "cuMemcpyDtoDAsync_v2(\(bytes) bytes)")
    }

    /// Queues setting every byte to `value`.
    public func fill(byte value: UInt8 = 0) throws {
        try context.makeCurrent()
        try context.driver.check(context.driver.cuMemsetD8Async(address, value, byteCount, context.stream),
                                 "cuMemsetD8Async(\(byteCount) bytes)")
    }
}
