/// Splits UTF-8 text into the chunks that byte-pair merges never cross (the GPT-2 convention,
/// written out by hand instead of as a regular expression).
///
/// Bytes fall into four classes: letters (`A-Z`, `a-z` and every byte `>= 0x80`, so a multi-byte
/// character is never split and non-Latin scripts count as letters), digits (`0-9`), whitespace
/// (space, `\t`, `\n`, `\v`, `\f`, `\r`) and other (punctuation, symbols, control bytes). A chunk is
///
///     " "? letter+  |  " "? digit+  |  " "? other+  |  whitespace+
///
/// where a run of whitespace followed by a non-space keeps its last byte for the next chunk when
/// that byte is a plain space, so words carry their leading space: `"Hi  you,\n"` becomes
/// `["Hi", " ", " you", ",", "\n"]`. Unlike GPT-2 there are no special cases for English
/// contractions (`'s`, `'ll`): the apostrophe is punctuation.
///
/// The chunks tile the input: concatenated, they are the input again.
public enum PreTokenizer {
    private enum ByteClass { case letter, digit, space, other }

    private static func byteClass(_ b: UInt8) -> ByteClass {
        switch b {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), 0x80...: .letter
        case UInt8(ascii: "0")...UInt8(ascii: "9"): .digit
        case 0x20, 0x09...0x0D: .space
        default: .other
        }
    }

    /// The chunks of `text`, in order (for inspection and tests; encoding uses `forEachChunk`).
    public static func chunks(of text: String) -> [String] {
        let bytes = Array(text.utf8)
        var out: [String] = []
        bytes.withUnsafeBufferPointer { buffer in
            forEachChunk(in: buffer) { out.append(String(decoding: bytes[$0], as: UTF8.self)) }
        }
        return out
    }

    /// Calls `body` with the byte range of each chunk of `bytes`, in order.
    static func forEachChunk(in bytes: UnsafeBufferPointer<UInt8>, _ body: (Range<Int>) -> Void) {
        let n = bytes.count
        var i = 0
        while i < n {
            var start = i
            if byteClass(bytes[i]) == .space {
                var j = i + 1
                while j < n && byteClass(bytes[j]) == .space { j += 1 }
                guard j < n && bytes[j - 1] == 0x20 else {
                    body(i..<j)
                    i = j
                    continue
                }
                // The run's last space starts the next chunk.
                if j - 1 > i { body(i..<(j - 1)) }
                start = j - 1
                i = j
            }
            let cls = byteClass(bytes[i])
            var j = i + 1
            while j < n && byteClass(bytes[j]) == cls { j += 1 }
            body(start..<j)
            i = j
        }
    }
}

/// A binary min-heap: `pop` returns the least element (by `<`).
struct BinaryHeap<Element: Comparable> {
    private var items: [Element] = []

    var isEmpty: Bool { items.isEmpty }

    mutating func push(_ element: Element) {
        items.append(element)
        var child = items.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard items[child] < items[parent] else { break }
            items.swapAt(child, parent)
            child = parent
        }
    }

    mutating func pop() -> Element? {
        guard !items.isEmpty else { return nil }
        items.swapAt(0, items.count - 1)
        let top = items.removeLast()
        var parent = 0
        while true {
            let left = 2 * parent + 1, right = left + 1
            var least = parent
            if left < items.count && items[left] < items[least] { least = left }
            if right < items.count && items[right] < items[least] { least = right }
            guard least != parent else { break }
            items.swapAt(parent, least)
            parent = least
        }
        return top
    }
}
