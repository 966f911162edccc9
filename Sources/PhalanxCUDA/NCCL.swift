import CNCCL
import Foundation

/// NCCL (`libnccl.so.2`), NVIDIA's collective communication library, loaded at run time like the
/// rest of CUDA: the entry points this package calls, as C function values typed by the `CNCCL`
/// header, and `check`, which turns an `ncclResult_t` into an `NCCLError`.
///
/// Loading sets `NCCL_NVLS_ENABLE=0` in the process environment unless it is already set: NVLink
/// SHARP (multicast) stays off, because on the shared GPU machines multicast objects can take the
/// GPUs out of service. Nothing in this package creates multicast objects.
///
/// NCCL needs no GPU to load; it needs one (and a CUDA context) to make a communicator
/// (`NCCLComm`).
public final class NCCL: @unchecked Sendable {
    /// The library the entry points come from.
    public let path: String
    /// `ncclGetVersion`: `10000 * major + 100 * minor + patch` (22805 for 2.28.5).
    public let version: Int

    let getUniqueId: ncclGetUniqueId_fn
    let commInitRank: ncclCommInitRank_fn
    let allReduce: ncclAllReduce_fn
    let reduceScatter: ncclReduceScatter_fn
    let allGather: ncclAllGather_fn
    let broadcast: ncclBroadcast_fn
    let groupStart: ncclGroupStart_fn
    let groupEnd: ncclGroupEnd_fn
    let commGetAsyncError: ncclCommGetAsyncError_fn
    let commAbort: ncclCommAbort_fn
    let commDestroy: ncclCommDestroy_fn
    private let getErrorString: ncclGetErrorString_fn

    /// NCCL as found by `defaultCandidates`, loaded once, or why it cannot be.
    public static let shared: Result<NCCL, CUDAUnavailable> = {
        do { return .success(try NCCL(candidates: defaultCandidates())) }
        catch let error as CUDAUnavailable { return .failure(error) }
        catch { return .failure(CUDAUnavailable("\(error)")) }
    }()

    /// Why NCCL cannot be loaded here (nil when it can).
    public static var unavailableReason: String? {
        if case .failure(let error) = shared { return error.reason }
        return nil
    }

    /// Where NCCL is looked for, in order:
    /// 1. the path in `PHALANX_NCCL`, if set;
    /// 2. `libnccl.so.2` on the loader's search path (`LD_LIBRARY_PATH`, ldconfig);
    /// 3. the CUDA toolkit's library folders (`<root>/targets/x86_64-linux/lib`, `<root>/lib64` for
    ///    each of `CUDAToolkit.roots`) and `/usr/lib/x86_64-linux-gnu` (the Debian/Ubuntu package);
    /// 4. the `nvidia-nccl` Python wheel, `<site>/nvidia/nccl/lib/libnccl.so.2`, where `<site>` is
    ///    `site-packages` or `dist-packages` of every `python3*` folder (newest name first) under
    ///    `$VIRTUAL_ENV/lib`, `$HOME/.local/lib`, `/usr/local/lib` and `/usr/lib`, in that order.
    ///
    /// - Parameters:
    ///   - environment: the variables read (`PHALANX_NCCL`, `CUDA_HOME`, `CUDA_PATH`, `VIRTUAL_ENV`, `HOME`).
    ///   - listDirectory: the names in a folder (empty when it does not exist); replaced in tests.
    public static func defaultCandidates(
        environment: [String: String] = ProcessInfo.processInfo.environment,
        listDirectory: (String) -> [String] = { (try? FileManager.default.contentsOfDirectory(atPath: $0)) ?? [] }
    ) -> [String] {
        let name = "libnccl.so.2"
        var candidates = environment["PHALANX_NCCL"].map { [$0] } ?? []
        candidates.append(name)
        let roots = [environment["CUDA_HOME"], environment["CUDA_PATH"], "/usr/local/cuda"].compactMap { $0 }
        candidates += roots.flatMap { ["\($0)/targets/x86_64-linux/lib/\(name)", "\($0)/lib64/\(name)"] }
        candidates.append("/usr/lib/x86_64-linux-gnu/\(name)")
        let pythonLibraries = [environment["VIRTUAL_ENV"].map { "\($0)/lib" }, environment["HOME"].map { "\($0)/.local/lib" },
                               "/usr/local/lib", "/usr/lib"].compactMap { $0 }
        for folder in pythonLibraries {
            for python in listDirectory(folder).filter({ $0.hasPrefix("python3") }).sorted(by: >) {
                for site in ["site-packages", "dist-packages"] {
                    candidates.append("\(folder)/\(python)/\(site)/nvidia/nccl/lib/\(name)")
                }
            }
        }
        var seen = Set<String>()
        return candidates.filter { seen.insert($0).inserted }
    }

    /// Sets `NCCL_NVLS_ENABLE=0` unless already set, opens the first of `candidates` that loads and
    /// resolves NCCL's entry points.
    ///
    /// - Throws: `CUDAUnavailable` naming every candidate and why each failed, or a missing entry point.
    public init(candidates: [String]) throws {
        setenv("NCCL_NVLS_ENABLE", "0", 0)
        let library = try DynamicLibrary.open(
            firstOf: candidates,
            what: "NCCL (libnccl.so.2: the libnccl2 package, the CUDA toolkit, or the nvidia-nccl-cu12/cu13 Python wheel; "
                + "set PHALANX_NCCL to its path)")
        path = library.path
        let getVersion: ncclGetVersion_fn = try library.function("ncclGetVersion")
        getUniqueId = try library.function("ncclGetUniqueId")
        commInitRank = try library.function("ncclCommInitRank")
        allReduce = try library.function("ncclAllReduce")
        reduceScatter = try library.function("ncclReduceScatter")
        allGather = try library.function("ncclAllGather")
        broadcast = try library.function("ncclBroadcast")
        groupStart = try library.function("ncclGroupStart")
        groupEnd = try library.function("ncclGroupEnd")
        commGetAsyncError = try library.function("ncclCommGetAsyncError")
        commAbort = try library.function("ncclCommAbort")
        commDestroy = try library.function("ncclCommDestroy")
        getErrorString = try library.function("ncclGetErrorString")
        var version: Int32 = 0
        _ = getVersion(&version)
        self.version = Int(version)
        guard self.version >= 21000 else {
            throw CUDAUnavailable("NCCL \(library.path) is version code \(self.version); Phalanx needs 2.10 or later (ncclAvg)")
        }
    }

    /// A fresh 128-byte `ncclUniqueId` (rank 0 makes it and hands it to every other rank).
    public func uniqueId() throws -> [UInt8] {
        var id = ncclUniqueId()
        try check(getUniqueId(&id), "ncclGetUniqueId")
        return withUnsafeBytes(of: &id) { Array($0) }
    }

    /// NCCL's description of a result code (`unhandled system error`).
    public func errorString(_ code: ncclResult_t) -> String {
        getErrorString(code).map { String(cString: $0) } ?? "ncclResult_t \(code)"
    }

    /// Throws an `NCCLError` naming `call` unless `code` is `ncclSuccess`.
    func check(_ code: ncclResult_t, _ call: @autoclosure () -> String) throws {
        if code != 0 { throw NCCLError(call: call(), code: code, message: errorString(code)) }
    }
}

/// An NCCL call failed, or a collective did not finish in time: names the call (with the rank
/// where there is one), NCCL's code and its text.
public struct NCCLError: Error, CustomStringConvertible {
    /// The entry point and what it was doing (`rank 1 of 2: ncclAllReduce(3 buffers)`).
    public let call: String
    /// The `ncclResult_t` code; -1 for a failure found by this package (a timeout, an aborted communicator).
    public let code: Int32
    /// NCCL's description of the code, or what timed out.
    public let message: String

    /// The call, the message and NCCL's code.
    public var description: String { "\(call) failed: \(message)" + (code >= 0 ? " (NCCL code \(code))" : "") }
}
