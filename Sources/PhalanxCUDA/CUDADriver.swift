/// The CUDA driver API (`libcuda.so.1`), loaded at run time: the entry points this package uses,
/// as typed Swift function values, and `check`, which turns a `CUresult` into a `CUDAError`.
///
/// Handles are opaque pointers (`CUcontext`, `CUstream`, `CUmodule`, `CUfunction`, `CUevent`);
/// device memory is a `CUdeviceptr`, a 64-bit integer. The `_v2` entry points are the 64-bit ABI
/// (`size_t` sizes, 64-bit device pointers) that `cuda.h` maps the plain names to: the unsuffixed
/// symbols are the old 32-bit ones and must not be called.
///
/// The driver comes with the GPU's kernel driver, not with a toolkit: where it is absent there is
/// no NVIDIA GPU to use, and `shared` holds a `CUDAUnavailable` saying so.
public final class CUDADriver: @unchecked Sendable {
    typealias Handle = OpaquePointer
    typealias Result = Int32

    /// The library the entry points come from.
    public let path: String
    /// `cuDriverGetVersion`: 1000 * major + 10 * minor (13000 for CUDA 13.0).
    public let version: Int

    let cuInit: @convention(c) (UInt32) -> Result
    let cuDriverGetVersion: @convention(c) (UnsafeMutablePointer<Int32>) -> Result
    let cuGetErrorName: @convention(c) (Result, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Result
    let cuGetErrorString: @convention(c) (Result, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> Result
    let cuDeviceGetCount: @convention(c) (UnsafeMutablePointer<Int32>) -> Result
    let cuDeviceGet: @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Result
    let cuDeviceGetName: @convention(c) (UnsafeMutablePointer<CChar>, Int32, Int32) -> Result
    let cuDeviceGetAttribute: @convention(c) (UnsafeMutablePointer<Int32>, Int32, Int32) -> Result
    let cuDeviceTotalMem: @convention(c) (UnsafeMutablePointer<Int>, Int32) -> Result
    let cuDevicePrimaryCtxRetain: @convention(c) (UnsafeMutablePointer<Handle?>, Int32) -> Result
    let cuDevicePrimaryCtxRelease: @convention(c) (Int32) -> Result
    let cuCtxSetCurrent: @convention(c) (Handle?) -> Result
    let cuCtxSynchronize: @convention(c) () -> Result
    let cuStreamCreate: @convention(c) (UnsafeMutablePointer<Handle?>, UInt32) -> Result
    let cuStreamDestroy: @convention(c) (Handle?) -> Result
    let cuStreamSynchronize: @convention(c) (Handle?) -> Result
    /// `CUDA_SUCCESS` (0) when the stream's work has finished, `CUDA_ERROR_NOT_READY` (600) while it runs.
    let cuStreamQuery: @convention(c) (Handle?) -> Result
    let cuModuleLoadData: @convention(c) (UnsafeMutablePointer<Handle?>, UnsafeRawPointer) -> Result
    let cuModuleUnload: @convention(c) (Handle?) -> Result
    let cuModuleGetFunction: @convention(c) (UnsafeMutablePointer<Handle?>, Handle?, UnsafePointer<CChar>) -> Result
    let cuMemAlloc: @convention(c) (UnsafeMutablePointer<UInt64>, Int) -> Result
    let cuMemFree: @convention(c) (UInt64) -> Result
    let cuMemcpyDtoH: @convention(c) (UnsafeMutableRawPointer, UInt64, Int) -> Result
    let cuMemcpyDtoDAsync: @convention(c) (UInt64, UInt64, Int, Handle?) -> Result
    let cuMemcpyHtoDAsync: @convention(c) (UInt64, UnsafeRawPointer, Int, Handle?) -> Result
    let cuMemsetD8Async: @convention(c) (UInt64, UInt8, Int, Handle?) -> Result
    let cuLaunchKernel: @convention(c) (
        Handle?, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, Handle?,
        UnsafeMutablePointer<UnsafeMutableRawPointer?>?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> Result
    let cuOccupancyMaxActiveBlocksPerMultiprocessor: @convention(c) (UnsafeMutablePointer<Int32>, Handle?, Int32, Int) -> Result
    let cuEventCreate: @convention(c) (UnsafeMutablePointer<Handle?>, UInt32) -> Result
    let cuEventDestroy: @convention(c) (Handle?) -> Result
    let cuEventRecord: @convention(c) (Handle?, Handle?) -> Result
    let cuEventSynchronize: @convention(c) (Handle?) -> Result
    let cuEventElapsedTime: @convention(c) (UnsafeMutablePointer<Float>, Handle?, Handle?) -> Result
    /// Makes a stream's later work wait until an event recorded on another stream is reached.
    let cuStreamWaitEvent: @convention(c) (Handle?, Handle?, UInt32) -> Result

    /// The driver of this machine, loaded and initialised once (`cuInit`), or why it cannot be.
    public static let shared: Swift.Result<CUDADriver, CUDAUnavailable> = {
        do { return .success(try CUDADriver(libraryNames: ["libcuda.so.1"])) }
        catch let error as CUDAUnavailable { return .failure(error) }
        catch { return .failure(CUDAUnavailable("\(error)")) }
    }()

    /// Opens the first of `libraryNames` that loads, resolves every entry point and calls `cuInit`.
    ///
    /// - Throws: `CUDAUnavailable` when no library loads, an entry point is missing, or `cuInit`
    ///   fails (no device, or a driver that does not match the kernel module).
    public init(libraryNames: [String]) throws {
        let library = try DynamicLibrary.open(
            firstOf: libraryNames,
            what: "The CUDA driver (it is installed with the NVIDIA kernel driver; this machine may have no NVIDIA GPU)")
        path = library.path
        cuInit = try library.function("cuInit")
        cuDriverGetVersion = try library.function("cuDriverGetVersion")
        cuGetErrorName = try library.function("cuGetErrorName")
        cuGetErrorString = try library.function("cuGetErrorString")
        cuDeviceGetCount = try library.function("cuDeviceGetCount")
        cuDeviceGet = try library.function("cuDeviceGet")
        cuDeviceGetName = try library.function("cuDeviceGetName")
        cuDeviceGetAttribute = try library.function("cuDeviceGetAttribute")
        cuDeviceTotalMem = try library.function("cuDeviceTotalMem_v2")
        cuDevicePrimaryCtxRetain = try library.function("cuDevicePrimaryCtxRetain")
        cuDevicePrimaryCtxRelease = try library.function("cuDevicePrimaryCtxRelease_v2")
        cuCtxSetCurrent = try library.function("cuCtxSetCurrent")
        cuCtxSynchronize = try library.function("cuCtxSynchronize")
        cuStreamCreate = try library.function("cuStreamCreate")
        cuStreamDestroy = try library.function("cuStreamDestroy_v2")
        cuStreamSynchronize = try library.function("cuStreamSynchronize")
        cuStreamQuery = try library.function("cuStreamQuery")
        cuModuleLoadData = try library.function("cuModuleLoadData")
        cuModuleUnload = try library.function("cuModuleUnload")
        cuModuleGetFunction = try library.function("cuModuleGetFunction")
        cuMemAlloc = try library.function("cuMemAlloc_v2")
        cuMemFree = try library.function("cuMemFree_v2")
        cuMemcpyDtoH = try library.function("cuMemcpyDtoH_v2")
        cuMemcpyDtoDAsync = try library.function("cuMemcpyDtoDAsync_v2")
        cuMemcpyHtoDAsync = try library.function("cuMemcpyHtoDAsync_v2")
        cuMemsetD8Async = try library.function("cuMemsetD8Async")
        cuLaunchKernel = try library.function("cuLaunchKernel")
        cuOccupancyMaxActiveBlocksPerMultiprocessor = try library.function("cuOccupancyMaxActiveBlocksPerMultiprocessor")
        cuEventCreate = try library.function("cuEventCreate")
        cuEventDestroy = try library.function("cuEventDestroy_v2")
        cuEventRecord = try library.function("cuEventRecord")
        cuEventSynchronize = try library.function("cuEventSynchronize")
        cuEventElapsedTime = try library.function("cuEventElapsedTime", "cuEventElapsedTime_v2")
        cuStreamWaitEvent = try library.function("cuStreamWaitEvent")

        var version: Int32 = 0
        _ = cuDriverGetVersion(&version)
        self.version = Int(version)
        let initResult = cuInit(0)
        if initResult != 0 {
            throw CUDAUnavailable("cuInit failed: \(errorName(initResult)) (\(initResult)): \(errorString(initResult)) "
                                  + "(driver \(library.path), CUDA \(version / 1000).\(version % 1000 / 10))")
        }
    }

    /// The number of CUDA devices this process can see (`cuDeviceGetCount`).
    public func deviceCount() throws -> Int {
        var count: Int32 = 0
        try check(cuDeviceGetCount(&count), "cuDeviceGetCount")
        return Int(count)
    }

    /// CUDA's name for a result code (`CUDA_ERROR_INVALID_VALUE`).
    public func errorName(_ code: Int32) -> String {
        var text: UnsafePointer<CChar>?
        return cuGetErrorName(code, &text) == 0 && text != nil ? String(cString: text!) : "CUresult \(code)"
    }

    /// CUDA's description of a result code (`invalid argument`).
    public func errorString(_ code: Int32) -> String {
        var text: UnsafePointer<CChar>?
        return cuGetErrorString(code, &text) == 0 && text != nil ? String(cString: text!) : "unknown error"
    }

    /// Throws a `CUDAError` naming `call` unless `code` is `CUDA_SUCCESS`.
    @inline(__always)
    func check(_ code: Int32, _ call: @autoclosure () -> String) throws {
        if code != 0 {
            throw CUDAError(call: call(), code: code, name: errorName(code), message: errorString(code))
        }
    }
}
