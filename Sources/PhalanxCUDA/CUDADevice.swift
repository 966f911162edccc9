import Foundation
import PhalanxRuntime

/// One GPU as a place where a model's tensors live and its layers run: the context (stream,
/// memory, compiled modules), one cuBLAS handle, the kernel sets compiled for it, and the first
/// error of the work queued on it.
///
/// Errors are sticky, as CUDA's own are: the layers' forward and backward passes do not throw
/// (the same code runs on the CPU), so device work runs inside `perform`, which records the first
/// error and skips all later work. Whoever drives the passes (the trainer, evaluation, decoding)
/// asks `checkFailure()` after each step and stops with the error. After a failure the device's
/// results are meaningless; nothing written before it (a checkpoint) is touched.
public final class CUDADevice: @unchecked Sendable, CustomStringConvertible {
    /// The GPU's context; every operation of this device is queued on its stream.
    public let context: CUDAContext
    /// The matrix products of every layer on this device.
    public let blas: CUBLAS
    private let lock = NSLock()
    private var firstFailure: Error?
    private var kernelSets: [String: Any] = [:]

    /// The device of `context`, with a cuBLAS handle of its own that takes cuBLASLt's first-choice
    /// algorithm for each shape (`CUBLAS.searchAlgorithms` off): a timed search can choose
    /// differently from one process to the next, and a resumed run must compute what the
    /// uninterrupted one did, bit for bit.
    ///
    /// - Throws: `CUDAUnavailable` without cuBLAS; `CUBLASError`.
    public init(context: CUDAContext) throws {
        self.context = context
        blas = try CUBLAS(context: context)
        blas.searchAlgorithms = false
    }

    /// The device of GPU 0, made once (`try CUDADevice.shared.get()` throws why there is none).
    public static let shared: Result<CUDADevice, CUDAUnavailable> = {
        do { return .success(try CUDADevice(context: try CUDAContext.shared.get())) }
        catch let error as CUDAUnavailable { return .failure(error) }
        catch { return .failure(CUDAUnavailable("\(error)")) }
    }()

    /// `cuda:0 (NVIDIA H200)`.
    public var description: String { "cuda:\(context.ordinal) (\(context.deviceName))" }

    /// The device memory a run may plan to fill before it allocates: 90% of the total (the rest:
    /// cuBLAS workspaces, kernels, the allocation cache's slack).
    public var plannableBytes: Int { context.totalMemory / 10 * 9 }

    /// `plannableBytes` in words, for refusals: `90% of cuda:0 (NVIDIA H200)'s 150.1 GB`.
    public var plannableDescription: String { "90% of \(self)'s \(MemoryBudget.describe(context.totalMemory))" }

    /// Runs `body` (which queues work on the stream) unless an earlier call failed; records the
    /// first error. Returns whether `body` ran and succeeded.
    @discardableResult
    public func perform(_ body: () throws -> Void) -> Bool {
        guard failure == nil else { return false }
        do {
            try body()
            return true
        } catch {
            record(error)
            return false
        }
    }

    /// `body`'s value, or nil when an earlier call failed or this one throws (recorded).
    public func value<T>(_ body: () throws -> T) -> T? {
        var result: T?
        perform { result = try body() }
        return result
    }

    /// Records `error` as this device's failure unless one is recorded already.
    public func record(_ error: Error) {
        lock.lock()
        defer { lock.unlock() }
        if firstFailure == nil { firstFailure = error }
    }

    /// The first error of the work queued on this device, if any.
    public var failure: Error? {
        lock.lock()
        defer { lock.unlock() }
        return firstFailure
    }

    /// Waits for the stream, then throws the first error of the work queued so far (a kernel's
    /// error surfaces here too); clears nothing: a failed device stays failed.
    public func checkFailure() throws {
        if let failure { throw failure }
        do { try context.synchronize() } catch {
            record(error)
            throw error
        }
    }

    /// The kernel set stored under `key`, made by `make` the first time (compilation happens once
    /// per device and key; a class's tuning, set once, holds for every later user).
    public func kernels<Set>(_ key: String, _ make: () throws -> Set) throws -> Set {
        lock.lock()
        defer { lock.unlock() }
        let fullKey = "\(Set.self)/\(key)"
        // The key names the type, so a stored set always has it. The entry is unwrapped before
        // the cast: cast directly, a missing entry would pass as a stored nil when `Set` is optional.
        if let stored = kernelSets[fullKey], let existing = stored as? Set { return existing }
        let set = try make()
        kernelSets[fullKey] = set
        return set
    }
}
