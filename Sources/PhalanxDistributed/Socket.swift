import Foundation
import Glibc

/// A blocking IPv4 TCP socket with deadlines on every wait (`poll`), for the rendezvous.
struct Socket {
    let descriptor: Int32

    /// A socket listening on `port` on every IPv4 interface (`SO_REUSEADDR`, so a restarted run
    /// can take the port of one that just ended).
    static func listening(port: Int) throws -> Socket {
        let socket = try make()
        var yes: Int32 = 1
        setsockopt(socket.descriptor, SOL_SOCKET, SO_REUSEADDR, &yes, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = 0  // INADDR_ANY
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(socket.descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(socket.descriptor, 128) == 0 else {
            let reason = errorText()
            socket.close()
            throw RendezvousError("rank 0 cannot listen on port \(port): \(reason) (is MASTER_PORT taken by another run?)")
        }
        return socket
    }

    /// A socket connected to `host:port`, retrying every 100 ms (rank 0 may not listen yet) until `deadline`.
    static func connecting(host: String, port: Int, before deadline: Deadline, who: String) throws -> Socket {
        var hints = addrinfo()
        hints.ai_family = AF_INET
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var lastError = "no attempt"
        repeat {
            var list: UnsafeMutablePointer<addrinfo>?
            let resolved = getaddrinfo(host, String(port), &hints, &list)
            if resolved == 0, let first = list {
                defer { freeaddrinfo(list) }
                var entry: UnsafeMutablePointer<addrinfo>? = first
                while let current = entry {
                    let socket = try make()
                    if connect(socket.descriptor, current.pointee.ai_addr, current.pointee.ai_addrlen) == 0 { return socket }
                    lastError = errorText()
                    socket.close()
                    entry = current.pointee.ai_next
                }
            } else {
                lastError = "cannot resolve \(host): \(String(cString: gai_strerror(resolved)))"
            }
            usleep(100_000)
        } while !deadline.hasPassed
        throw RendezvousError("\(who) could not reach rank 0 at \(host):\(port) before its timeout (\(lastError))")
    }

    private static func make() throws -> Socket {
        let descriptor = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw RendezvousError("socket(): \(errorText())") }
        return Socket(descriptor: descriptor)
    }

    /// The next connection, or nil when none arrives before `deadline`.
    func accept(before deadline: Deadline) throws -> Socket? {
        while try wait(for: Int16(POLLIN), before: deadline) {
            let peer = Glibc.accept(descriptor, nil, nil)
            if peer >= 0 { return Socket(descriptor: peer) }
            if errno != EINTR && errno != ECONNABORTED { throw RendezvousError("accept(): \(Socket.errorText())") }
        }
        return nil
    }

    /// Exactly `count` bytes.
    ///
    /// - Throws: `RendezvousError` when the peer closes first or `deadline` passes.
    func receive(_ count: Int, before deadline: Deadline) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var received = 0
        while received < count {
            guard try wait(for: Int16(POLLIN), before: deadline) else { throw RendezvousError("timed out waiting for data") }
            let n = bytes.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress! + received, count - received, 0) }
            if n == 0 { throw RendezvousError("the connection was closed") }
            if n < 0 && errno != EINTR { throw RendezvousError("recv(): \(Socket.errorText())") }
            received += max(n, 0)
        }
        return bytes
    }

    /// Sends all of `bytes` (never raising SIGPIPE).
    func send(_ bytes: [UInt8]) throws {
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(descriptor, $0.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno != EINTR { throw RendezvousError("send(): \(Socket.errorText())") }
            sent += max(n, 0)
        }
    }

    func close() { _ = Glibc.close(descriptor) }

    /// Whether `events` became ready before `deadline`.
    private func wait(for events: Int16, before deadline: Deadline) throws -> Bool {
        while true {
            var entry = pollfd(fd: descriptor, events: events, revents: 0)
            let ready = poll(&entry, 1, deadline.millisecondsLeft)
            if ready > 0 { return true }
            if ready == 0 { return false }
            if errno != EINTR { throw RendezvousError("poll(): \(Socket.errorText())") }
        }
    }

    static func errorText() -> String { String(cString: strerror(errno)) }
}
