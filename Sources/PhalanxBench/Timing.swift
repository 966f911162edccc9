import Foundation

/// Wall-clock timing for benchmarks: a warm-up call, then the median of `repeats` calls.
public enum Timing {
    /// Seconds taken by one call of `body`.
    public static func seconds(_ body: () -> Void) -> Double {
        let clock = ContinuousClock()
        let elapsed = clock.measure(body)
        return Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) * 1e-18
    }

    /// The fewest seconds of `repeats` calls after `warmUp` untimed calls: for a ceiling, which
    /// noise can only lower.
    public static func fastest(repeats: Int, warmUp: Int = 1, _ body: () -> Void) -> Double {
        for _ in 0..<warmUp { body() }
        return (0..<max(repeats, 1)).map { _ in seconds(body) }.min()!
    }

    /// Median seconds over `repeats` calls after `warmUp` untimed calls. Medians, because the
    /// machine is shared and noisy: one slow outlier must not move the figure.
    public static func median(repeats: Int, warmUp: Int = 1, _ body: () -> Void) -> Double {
        for _ in 0..<warmUp { body() }
        let samples = (0..<max(repeats, 1)).map { _ in seconds(body) }.sorted()
        let n = samples.count
        return n % 2 == 1 ? samples[n / 2] : (samples[n / 2 - 1] + samples[n / 2]) / 2
    }
}

/// A float buffer for benchmarks, filled so that every page is touched before timing.
public final class BenchBuffer {
    /// The elements, 64-byte aligned; valid as long as the buffer lives.
    public let pointer: UnsafeMutableBufferPointer<Float>

    /// `count` floats, element `i` set to `fill(i)`.
    public init(count: Int, fill: (Int) -> Float) {
        // 64-byte aligned, as `Tensor`, so kernels may use aligned (streaming) stores.
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1) * 4, alignment: 64)
        pointer = UnsafeMutableBufferPointer(start: raw.bindMemory(to: Float.self, capacity: count), count: count)
        for i in 0..<count { pointer[i] = fill(i) }
    }

    deinit { UnsafeMutableRawPointer(pointer.baseAddress!).deallocate() }

    /// The elements as a read-only buffer.
    public var readOnly: UnsafeBufferPointer<Float> { UnsafeBufferPointer(pointer) }
}
