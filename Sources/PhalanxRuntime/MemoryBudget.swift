import Foundation

/// Allocation sizes checked against the machine before anything is allocated, so that a hostile
/// file or flag is refused with a message instead of stopping the program in the allocator.
public enum MemoryBudget {
    /// Physical memory of this machine, in bytes.
    public static var physicalBytes: Int { Int(clamping: ProcessInfo.processInfo.physicalMemory) }

    /// `a * b * ...`, or nil when the product overflows `Int` or a factor is negative.
    public static func product(_ factors: Int...) -> Int? { product(factors) }

    /// The product of `factors`, or nil when it overflows `Int` or a factor is negative.
    public static func product(_ factors: [Int]) -> Int? {
        var total = 1
        for f in factors {
            guard f >= 0 else { return nil }
            let (p, overflow) = total.multipliedReportingOverflow(by: f)
            if overflow { return nil }
            total = p
        }
        return total
    }

    /// `a + b + ...`, or nil when a term is nil or the sum overflows `Int`.
    public static func sum(_ terms: Int?...) -> Int? {
        var total = 0
        for t in terms {
            guard let t else { return nil }
            let (s, overflow) = total.addingReportingOverflow(t)
            if overflow { return nil }
            total = s
        }
        return total
    }

    /// Whether `bytes` (nil: more than `Int` counts) fits in physical memory.
    public static func fits(_ bytes: Int?) -> Bool { bytes.map { $0 <= physicalBytes } ?? false }

    /// `bytes` in a readable unit ("1.5 GB"); "more than 9.2 EB" for nil.
    public static func describe(_ bytes: Int?) -> String {
        guard let bytes else { return "more than 9.2 EB" }
        let units = ["bytes", "kB", "MB", "GB", "TB", "PB", "EB"]
        var value = Double(bytes), unit = 0
        while value >= 1000 && unit < units.count - 1 { value /= 1000; unit += 1 }
        return unit == 0 ? "\(bytes) bytes" : String(format: "%.1f %@", value, units[unit])
    }
}
