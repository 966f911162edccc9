import Foundation

/// A new empty folder under the system temporary folder; the caller removes it.
public func temporaryFolder() -> URL {
    let url = FileManager.default.temporaryDirectory.appendingPathComponent("phalanx-test-\(UUID().uuidString)")
    do {
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    } catch {
        preconditionFailure("cannot create the temporary folder \(url.path): \(error)")
    }
    return url
}
