import Foundation

/// Device memory that `DeviceBuffer`s gave back, kept by size for the next buffer of the same size
/// instead of `cuMemFree` and `cuMemAlloc` (each of which waits for the device): a layer called
/// again and again allocates nothing after its first call.
///
/// Reuse is safe without events because every operation of a `CUDAContext` runs on its one
/// stream, in order: work queued with the old buffer precedes any work queued with the new one,
/// and host copies wait for the stream first.
final class DeviceMemoryCache: @unchecked Sendable {
    private let lock = NSLock()
    private var free: [Int: [UInt64]] = [:]
    private(set) var cachedBytes = 0

    /// A cached allocation of exactly `byteCount` bytes, or nil.
    func take(_ byteCount: Int) -> UInt64? {
        lock.lock()
        defer { lock.unlock() }
        guard let address = free[byteCount]?.popLast() else { return nil }
        cachedBytes -= byteCount
        return address
    }

    /// Keeps `address` (an allocation of `byteCount` bytes) for `take`.
    func give(_ address: UInt64, byteCount: Int) {
        lock.lock()
        defer { lock.unlock() }
        free[byteCount, default: []].append(address)
        cachedBytes += byteCount
    }

    /// Removes and returns every cached allocation.
    func drain() -> [UInt64] {
        lock.lock()
        defer { lock.unlock() }
        let all = free.values.flatMap { $0 }
        free = [:]
        cachedBytes = 0
        return all
    }
}
