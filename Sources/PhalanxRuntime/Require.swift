/// Stops the program with `message` when a caller broke a documented contract (wrong buffer
/// size, impossible configuration).
///
/// Why not `precondition`: optimized builds drop its message and trap silently, and a user who
/// passed a wrong shape deserves to read what was expected. `fatalError` keeps the message in
/// every build configuration.
@inlinable @inline(__always)
public func require(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String,
                    file: StaticString = #fileID, line: UInt = #line) {
    if !condition() { fatalError(message(), file: file, line: line) }
}
