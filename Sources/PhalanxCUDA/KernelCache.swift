import SWR
import Foundation

/// What identifies a compiled kernel module: a hash of its source and compile options, and the GPU
/// architecture it was compiled for (`sm_90`). Equal keys mean interchangeable CUBINs.
public struct KernelKey: Hashable, Sendable, CustomStringConvertible {
    /// FNV-1a (64-bit) of the source, a zero byte, and the options joined by zero bytes: stable
    /// across runs and machines, unlike `Hasher`.
    public let sourceHash: UInt64
    /// `sm_XY` for compute capability X.Y.
    public let architecture: String

    /// The key of `source` compiled with `options` for `architecture`.
    public init(source: String, options: [String], architecture: String) {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        func add(_ bytes: some Sequence<UInt8>) {
            for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x0000_0100_0000_01b3 }
        }
        add(source.utf8)
        for option in options {
            add([0])
            add(option.utf8)
        }
        sourceHash = hash
        self.architecture = architecture
    }

    /// `sm_90-0123456789abcdef`.
    public var description: String {
        let hex = String(sourceHash, radix: 16)
        return "\(architecture)-\(String(repeating: "0", count: 16 - hex.count))\(hex)"
    }
}

/// The CUDA sources of this package, shipped as resource files (`Kernels/*.cu`) and compiled at
/// run time.
public enum KernelSources {
    /// The folder holding the `.cu` files (inside the `PhalanxCUDA` resource bundle, which must sit
    /// beside an executable that is moved to another machine).
    public static var directory: URL? {
        Bundle.module.url(forResource: "Kernels", withExtension: nil)
    }

    /// The names of the shipped sources, without extension, sorted.
    public static var names: [String] {
        guard let directory,
              let files = try? FileManager.default.contentsOfDirectory(atPath: directory.path) else { return [] }
        return files.filter { $0.hasSuffix(".cu") }.map { String($0.dropLast(3)) }.sorted()
    }

    /// The text of `Kernels/<name>.cu`.
    ///
    /// - Throws: `CUDAUnavailable` when the resource bundle or the file is missing.
    public static func source(named name: String) throws -> String {
        guard let directory else {
            throw CUDAUnavailable("the PhalanxCUDA resource bundle has no Kernels folder (copy Phalanx_PhalanxCUDA.resources beside the executable)")
        }
        let url = directory.appendingPathComponent("\(name).cu")
        do { return try String(contentsOf: url, encoding: .utf8) }
        catch { throw CUDAUnavailable("kernel source \(url.path) could not be read: \(error)") }
    }

    /// The compile definitions that give the kernels their shape constants: `SWR_BLOCK_LENGTH`
    /// (positions per block, the model configuration's `blockLength`) and `SWR_HEAD_DIM`
    /// (`JaggedWindow.standardHeadDim`). Part of the compile options, hence of the kernel cache's key.
    public static func definitions(blockLength: Int) -> [String] {
        ["-DSWR_BLOCK_LENGTH=\(blockLength)", "-DSWR_HEAD_DIM=\(JaggedWindow.standardHeadDim)"]
    }

    /// The NVRTC options every kernel of this package is compiled with for `architecture`:
    /// C++17, and the toolkit's headers when this machine has them.
    public static func compileOptions(architecture: String) -> [String] {
        ["--gpu-architecture=\(architecture)", "-std=c++17"]
            + (CUDAToolkit.includeDirectory.map { ["-I\($0)"] } ?? [])
    }
}
