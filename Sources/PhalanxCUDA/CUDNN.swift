import Foundation

/// cuDNN 9's C entry points for the backend graph API (`libcudnn.so.9`), opened at run time with
/// `dlopen`, so that nothing of cuDNN is needed to build or to run without it.
///
/// Where it is looked for, first found wins: the path in `PHALANX_CUDNN` (a file), then
/// `libcudnn.so.9` by name (`LD_LIBRARY_PATH`, the loader's cache), then the Debian/Ubuntu
/// package's `/usr/lib/x86_64-linux-gnu` and each CUDA toolkit's `lib64`. `libcudnn.so.9` is a
/// thin library that loads cuDNN's other parts (`libcudnn_graph.so.9`, the engines) from its own
/// folder.
final class CUDNNLibrary: @unchecked Sendable {
    typealias Status = Int32
    typealias Handle = OpaquePointer

    /// The library that was loaded.
    let path: String
    /// `cudnnGetVersion`: 10000 * major + 100 * minor + patch (91400 for 9.14.0).
    let version: Int

    let create: @convention(c) (UnsafeMutablePointer<Handle?>) -> Status
    let destroy: @convention(c) (Handle?) -> Status
    let setStream: @convention(c) (Handle?, OpaquePointer?) -> Status
    let errorString: @convention(c) (Status) -> UnsafePointer<CChar>?
    let lastErrorString: @convention(c) (UnsafeMutablePointer<CChar>?, Int) -> Void
    let createDescriptor: @convention(c) (Int32, UnsafeMutablePointer<OpaquePointer?>) -> Status
    let destroyDescriptor: @convention(c) (OpaquePointer?) -> Status
    let finalize: @convention(c) (OpaquePointer?) -> Status
    let setAttribute: @convention(c) (OpaquePointer?, Int32, Int32, Int64, UnsafeRawPointer?) -> Status
    let getAttribute: @convention(c) (OpaquePointer?, Int32, Int32, Int64, UnsafeMutablePointer<Int64>?,
                                      UnsafeMutableRawPointer?) -> Status
    let execute: @convention(c) (Handle?, OpaquePointer?, OpaquePointer?) -> Status

    private init(_ library: DynamicLibrary) throws {
        path = library.path
        let getVersion: @convention(c) () -> Int = try library.function("cudnnGetVersion")
        version = getVersion()
        create = try library.function("cudnnCreate")
        destroy = try library.function("cudnnDestroy")
        setStream = try library.function("cudnnSetStream")
        errorString = try library.function("cudnnGetErrorString")
        lastErrorString = try library.function("cudnnGetLastErrorString")
        createDescriptor = try library.function("cudnnBackendCreateDescriptor")
        destroyDescriptor = try library.function("cudnnBackendDestroyDescriptor")
        finalize = try library.function("cudnnBackendFinalize")
        setAttribute = try library.function("cudnnBackendSetAttribute")
        getAttribute = try library.function("cudnnBackendGetAttribute")
        execute = try library.function("cudnnBackendExecute")
    }

    /// The library, opened once per process, or why it could not be.
    static let shared: Result<CUDNNLibrary, CUDAUnavailable> = {
        var candidates = ["libcudnn.so.9", "/usr/lib/x86_64-linux-gnu/libcudnn.so.9"]
            + CUDAToolkit.roots.flatMap { ["\($0)/lib64/libcudnn.so.9", "\($0)/targets/x86_64-linux/lib/libcudnn.so.9"] }
        if let path = ProcessInfo.processInfo.environment["PHALANX_CUDNN"], !path.isEmpty { candidates.insert(path, at: 0) }
        do {
            let library = try CUDNNLibrary(DynamicLibrary.open(firstOf: candidates, what: "cuDNN 9 (libcudnn.so.9)"))
            guard library.version >= 90000 else {
                return .failure(CUDAUnavailable("\(library.path) is cuDNN \(library.versionString); the graph API needs 9.0 or later"))
            }
            return .success(library)
        } catch let error as CUDAUnavailable {
            return .failure(error)
        } catch {
            return .failure(CUDAUnavailable("cuDNN: \(error)"))
        }
    }()

    /// `major.minor.patch`.
    var versionString: String { "\(version / 10000).\(version / 100 % 100).\(version % 100)" }

    /// Throws `CUDNNError` for a status other than success, with cuDNN's own last message.
    func check(_ status: Status, _ call: @autoclosure () -> String) throws {
        guard status != 0 else { return }
        var message = [CChar](repeating: 0, count: 1024)
        lastErrorString(&message, message.count)
        let name = errorString(status).map { String(cString: $0) } ?? "status \(status)"
        throw CUDNNError(call: call(), status: status, name: name, detail: String(decoding: message.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
    }
}

/// A cuDNN call failed: the call (with the graph node or attribute it was building), cuDNN's
/// status code and name, and cuDNN's last error message.
public struct CUDNNError: Error, CustomStringConvertible {
    /// What was being done (`finalize operation graph (attention forward B=1 L=4096 ...)`).
    public let call: String
    /// The `cudnnStatus_t` code (3000s: not supported; 2000s: bad parameter; 4000s: execution failed).
    public let status: Int32
    /// `cudnnGetErrorString` of the status.
    public let name: String
    /// `cudnnGetLastErrorString`: cuDNN's explanation, often naming the rule a graph broke.
    public let detail: String

    /// Whether cuDNN declined the graph or shape rather than failing on bad input or at run time.
    public var isNotSupported: Bool { status / 1000 == 3 }

    /// The call, the status name and code, and cuDNN's message.
    public var description: String {
        "\(call) failed: \(name) (\(status))" + (detail.isEmpty ? "" : ": \(detail)")
    }
}

/// A cuDNN handle bound to one context's stream (cuDNN uses the runtime API, which finds the
/// primary context that `CUDAContext` retains).
final class CUDNNHandle: @unchecked Sendable {
    let library: CUDNNLibrary
    let context: CUDAContext
    let handle: CUDNNLibrary.Handle

    init(context: CUDAContext) throws {
        let library = try CUDNNLibrary.shared.get()
        try context.makeCurrent()
        var handle: CUDNNLibrary.Handle?
        try library.check(library.create(&handle), "cudnnCreate")
        guard let handle else { throw CUDAUnavailable("cudnnCreate returned no handle") }
        try library.check(library.setStream(handle, context.stream), "cudnnSetStream")
        (self.library, self.context, self.handle) = (library, context, handle)
    }

    deinit {
        _ = context.driver.cuCtxSetCurrent(context.context)
        _ = library.destroy(handle)
    }
}
