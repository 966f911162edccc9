import Foundation

/// One GPU, ready for work: its driver context (the device's primary context, the one the CUDA
/// runtime and cuBLAS also use, so buffers can be shared with them), a stream that every
/// operation of this package is queued on in order, and a cache of compiled kernel modules.
///
/// Operations are asynchronous with respect to the host unless they say otherwise; copies to and
/// from the host wait for the stream first. A context may be used from any thread: every entry
/// point makes it current on the calling thread.
public final class CUDAContext: @unchecked Sendable {
    /// The driver API the context was created through.
    public let driver: CUDADriver
    /// The device ordinal.
    public let ordinal: Int
    /// `cuDeviceGetName` (`NVIDIA H200`).
    public let deviceName: String
    /// Compute capability (9.0 on Hopper).
    public let computeCapability: (major: Int, minor: Int)
    /// Streaming multiprocessors.
    public let multiprocessorCount: Int
    /// Device memory in bytes.
    public let totalMemory: Int
    /// The NVRTC target for this device: `sm_90` for compute capability 9.0.
    public var architecture: String { "sm_\(computeCapability.major)\(computeCapability.minor)" }

    let device: Int32
    let context: OpaquePointer
    let stream: OpaquePointer
    private let lock = NSLock()
    private var modules: [KernelKey: OpaquePointer] = [:]
    private var occupancy: [OccupancyKey: Int] = [:]
    let memory = DeviceMemoryCache()
    private struct OccupancyKey: Hashable { let function: UInt; let threads: Int }

    /// The context of device 0, created once, or why there is none (`try CUDAContext.shared.get()`
    /// throws that `CUDAUnavailable`). Tests that need a GPU are enabled by `isAvailable` and say
    /// `unavailableReason` when skipped.
    public static let shared: Result<CUDAContext, CUDAUnavailable> = {
        do { return .success(try CUDAContext(ordinal: 0)) }
        catch let error as CUDAUnavailable { return .failure(error) }
        catch { return .failure(CUDAUnavailable("\(error)")) }
    }()

    /// Whether a CUDA device can be used here.
    public static var isAvailable: Bool {
        if case .success = shared { return true }
        return false
    }

    /// Why no CUDA device can be used here (nil when one can).
    public static var unavailableReason: String? {
        if case .failure(let error) = shared { return error.reason }
        return nil
    }

    /// Retains device `ordinal`'s primary context and creates a stream on it.
    ///
    /// - Throws: `CUDAUnavailable` when the driver cannot be loaded or the device does not exist;
    ///   `CUDAError` when a driver call fails.
    public init(ordinal: Int = 0, driver: CUDADriver? = nil) throws {
        let driver = try driver ?? CUDADriver.shared.get()
        self.driver = driver
        self.ordinal = ordinal
        var count: Int32 = 0
        try driver.check(driver.cuDeviceGetCount(&count), "cuDeviceGetCount")
        guard ordinal >= 0 && ordinal < Int(count) else {
            throw CUDAUnavailable(count == 0 ? "the CUDA driver (\(driver.path)) finds no device"
                                             : "no CUDA device \(ordinal): the driver finds \(count)")
        }
        var device: Int32 = 0
        try driver.check(driver.cuDeviceGet(&device, Int32(ordinal)), "cuDeviceGet(\(ordinal))")
        self.device = device
        var name = [CChar](repeating: 0, count: 256)
        try driver.check(driver.cuDeviceGetName(&name, Int32(name.count), device), "cuDeviceGetName")
        deviceName = String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        func attribute(_ code: Int32, _ label: String) throws -> Int {
            var value: Int32 = 0
            try driver.check(driver.cuDeviceGetAttribute(&value, code, device), "cuDeviceGetAttribute(\(label))")
            return Int(value)
        }
        // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR, _MULTIPROCESSOR_COUNT.
        computeCapability = (try attribute(75, "compute capability major"), try attribute(76, "compute capability minor"))
        multiprocessorCount = try attribute(16, "multiprocessor count")
        var memory = 0
        try driver.check(driver.cuDeviceTotalMem(&memory, device), "cuDeviceTotalMem_v2")
        totalMemory = memory

        var context: OpaquePointer?
        try driver.check(driver.cuDevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain(\(ordinal))")
        self.context = context!
        try driver.check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
        var stream: OpaquePointer?
        do {
            try driver.check(driver.cuStreamCreate(&stream, 0), "cuStreamCreate")
        } catch {
            _ = driver.cuDevicePrimaryCtxRelease(device)
            throw error
        }
        self.stream = stream!
    }

    deinit {
        _ = driver.cuCtxSetCurrent(context)
        _ = driver.cuStreamSynchronize(stream)
        for module in modules.values { _ = driver.cuModuleUnload(module) }
        for address in memory.drain() { _ = driver.cuMemFree(address) }
        _ = driver.cuStreamDestroy(stream)
        _ = driver.cuDevicePrimaryCtxRelease(device)
    }

    /// Makes this context current on the calling thread (driver calls act on the current one).
    func makeCurrent() throws {
        try driver.check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    }

    /// Waits until everything queued on the stream has finished, and reports a kernel's error.
    public func synchronize() throws {
        try makeCurrent()
        try driver.check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
    }

    // MARK: Memory

    /// A device allocation of `byteCount` bytes: a cached one of that size, else `cuMemAlloc`
    /// (which, on running out of memory, is retried once after the cache is freed).
    func allocate(_ byteCount: Int) throws -> UInt64 {
        // cuMemAlloc refuses 0 bytes: an empty buffer holds one byte nobody reads.
        let bytes = max(byteCount, 1)
        if let address = memory.take(bytes) { return address }
        try makeCurrent()
        var address: UInt64 = 0
        if driver.cuMemAlloc(&address, bytes) != 0 {
            try releaseCachedMemory()
            try driver.check(driver.cuMemAlloc(&address, bytes), "cuMemAlloc_v2(\(byteCount) bytes)")
        }
        return address
    }

    /// Bytes held in the cache of allocations that buffers gave back.
    public var cachedMemoryBytes: Int { memory.cachedBytes }

    /// Waits for the stream, then frees every cached allocation (`cuMemFree`).
    public func releaseCachedMemory() throws {
        try synchronize()
        for address in memory.drain() { try driver.check(driver.cuMemFree(address), "cuMemFree_v2") }
    }

    // MARK: Kernels

    /// A kernel entry point (`extern "C" __global__`) of a loaded module.
    public struct Function: @unchecked Sendable {
        let handle: OpaquePointer
        /// The kernel's symbol name, as in the source (`extern "C"`).
        public let name: String
    }

    /// The entry points `names` of the module compiled from `source` for this device: the module
    /// comes from the cache when this context has loaded it before (keyed by `KernelKey`: source,
    /// options, architecture), else is compiled with NVRTC to a CUBIN and loaded with
    /// `cuModuleLoadData`. `extraOptions` follow `KernelSources.compileOptions(architecture:)`.
    ///
    /// - Throws: `CUDAUnavailable` without NVRTC, `NVRTCError` with the log when the source does
    ///   not compile, `CUDAError` when loading fails or a name is not in the module.
    public func functions(_ names: [String], source: String, sourceName: String,
                          options extraOptions: [String] = []) throws -> [Function] {
        let options = KernelSources.compileOptions(architecture: architecture) + extraOptions
        let key = KernelKey(source: source, options: options, architecture: architecture)
        try makeCurrent()
        lock.lock()
        defer { lock.unlock() }
        let module: OpaquePointer
        if let cached = modules[key] {
            module = cached
        } else {
            let compiled = try NVRTC.shared.get().compile(source: source, name: sourceName, options: options)
            var loaded: OpaquePointer?
            try compiled.cubin.withUnsafeBytes { bytes in
                try driver.check(driver.cuModuleLoadData(&loaded, bytes.baseAddress!),
                                 "cuModuleLoadData(\(sourceName), \(key))")
            }
            module = loaded!
            modules[key] = module
        }
        return try names.map { name in
            var function: OpaquePointer?
            try driver.check(driver.cuModuleGetFunction(&function, module, name), "cuModuleGetFunction(\(name))")
            return Function(handle: function!, name: name)
        }
    }

    /// How many thread blocks of `threadsPerBlock` threads running `function` fit on one
    /// multiprocessor at once (`cuOccupancyMaxActiveBlocksPerMultiprocessor`; registers and
    /// shared memory decide), cached.
    public func residentBlocks(_ function: Function, threadsPerBlock: Int) throws -> Int {
        let key = OccupancyKey(function: UInt(bitPattern: UnsafeRawPointer(function.handle)), threads: threadsPerBlock)
        lock.lock()
        defer { lock.unlock() }
        if let blocks = occupancy[key] { return blocks }
        try makeCurrent()
        var blocks: Int32 = 0
        try driver.check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, function.handle, Int32(threadsPerBlock), 0),
                         "cuOccupancyMaxActiveBlocksPerMultiprocessor(\(function.name), \(threadsPerBlock) threads)")
        occupancy[key] = Int(blocks)
        return Int(blocks)
    }

    /// The number of modules compiled and loaded so far (each `KernelKey` once).
    public var loadedModuleCount: Int {
        lock.lock()
        defer { lock.unlock() }
        return modules.count
    }

    /// One kernel argument, passed by value (a buffer as its device address).
    public enum Argument {
        case buffer(DeviceBuffer)
        case int32(Int32)
        case int64(Int64)
        case float32(Float)
    }

    /// Queues `function` on the stream over a `grid` of thread blocks of `block` threads.
    public func launch(_ function: Function, grid: (x: Int, y: Int, z: Int), block: (x: Int, y: Int, z: Int),
                       sharedMemoryBytes: Int = 0, arguments: [Argument]) throws {
        try makeCurrent()
        // cuLaunchKernel takes one pointer per argument to its value; the values live here until
        // the call returns (the driver copies them at launch).
        let storage = UnsafeMutableRawPointer.allocate(byteCount: 8 * max(arguments.count, 1), alignment: 8)
        defer { storage.deallocate() }
        var pointers: [UnsafeMutableRawPointer?] = []
        for (index, argument) in arguments.enumerated() {
            let slot = storage + 8 * index
            switch argument {
            case .buffer(let buffer): slot.storeBytes(of: buffer.address, as: UInt64.self)
            case .int32(let value): slot.storeBytes(of: value, as: Int32.self)
            case .int64(let value): slot.storeBytes(of: value, as: Int64.self)
            case .float32(let value): slot.storeBytes(of: value, as: Float.self)
            }
            pointers.append(slot)
        }
        let result = pointers.withUnsafeMutableBufferPointer { parameters in
            driver.cuLaunchKernel(function.handle, UInt32(grid.x), UInt32(grid.y), UInt32(grid.z),
                                  UInt32(block.x), UInt32(block.y), UInt32(block.z), UInt32(sharedMemoryBytes),
                                  stream, parameters.baseAddress, nil)
        }
        try driver.check(result, "cuLaunchKernel(\(function.name), grid \(grid), block \(block))")
        withExtendedLifetime(arguments) {}
    }
}

/// A point in the stream's work, for timing it: record two events around work on the stream, and
/// `milliseconds(to:)` gives the device time between them.
public final class CUDAEvent: @unchecked Sendable {
    /// The context whose stream the event marks.
    public let context: CUDAContext
    let event: OpaquePointer

    /// An event on `context`, not yet recorded.
    ///
    /// - Throws: `CUDAError` when `cuEventCreate` fails.
    public init(context: CUDAContext) throws {
        self.context = context
        try context.makeCurrent()
        var event: OpaquePointer?
        try context.driver.check(context.driver.cuEventCreate(&event, 0), "cuEventCreate")
        self.event = event!
    }

    deinit { _ = context.driver.cuEventDestroy(event) }

    /// Marks the current end of the context's stream.
    public func record() throws {
        try context.makeCurrent()
        try context.driver.check(context.driver.cuEventRecord(event, context.stream), "cuEventRecord")
    }

    /// Device milliseconds from this event to `later`, waiting for `later` to be reached.
    public func milliseconds(to later: CUDAEvent) throws -> Double {
        try context.makeCurrent()
        try context.driver.check(context.driver.cuEventSynchronize(later.event), "cuEventSynchronize")
        var milliseconds: Float = 0
        try context.driver.check(context.driver.cuEventElapsedTime(&milliseconds, event, later.event), "cuEventElapsedTime")
        return Double(milliseconds)
    }
}
