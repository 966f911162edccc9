import Glibc

/// A shared library opened at run time with `dlopen`, so that nothing CUDA is linked at build
/// time and the package builds and runs where no GPU exists.
final class DynamicLibrary: @unchecked Sendable {
    /// The name or path that opened it.
    let path: String
    private let handle: UnsafeMutableRawPointer

    /// Opens the first of `candidates` (names searched the usual way, or absolute paths) that loads.
    ///
    /// - Throws: `CUDAUnavailable` listing every candidate and `dlerror`'s reason for each.
    static func open(firstOf candidates: [String], what: String) throws -> DynamicLibrary {
        var failures: [String] = []
        for candidate in candidates {
            if let handle = dlopen(candidate, RTLD_NOW | RTLD_LOCAL) {
                return DynamicLibrary(path: candidate, handle: handle)
            }
            failures.append(dlerror().map { String(cString: $0) } ?? "\(candidate): not found")
        }
        throw CUDAUnavailable("\(what) could not be loaded; tried \(candidates.joined(separator: ", ")): "
                              + failures.joined(separator: "; "))
    }

    private init(path: String, handle: UnsafeMutableRawPointer) {
        self.path = path
        self.handle = handle
    }

    /// The entry point `names[0]` (or the first of its alternatives found) as a C function of type `T`.
    func function<T>(_ names: String..., as type: T.Type = T.self) throws -> T {
        for name in names {
            if let symbol = dlsym(handle, name) { return unsafeBitCast(symbol, to: T.self) }
        }
        throw CUDAUnavailable("\(path) has no entry point \(names.joined(separator: " or ")) (too old a version?)")
    }
}
