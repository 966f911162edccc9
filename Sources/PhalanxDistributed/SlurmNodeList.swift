import Foundation

/// Slurm's compressed host lists (`SLURM_JOB_NODELIST`): comma-separated entries, each a name
/// with bracketed groups of numbers and ranges, `gpu[01-04,07],login2` for gpu01, gpu02, gpu03,
/// gpu04, gpu07, login2. Digits keep the width written (`01-04` gives `01`, not `1`), and several
/// groups multiply out (`r[1-2]n[1-2]` gives r1n1, r1n2, r2n1, r2n2).
public enum SlurmNodeList {
    /// The first host of `list`: the first entry (commas inside brackets do not separate
    /// entries), each bracket group replaced by its first number.
    ///
    /// - Throws: `LaunchEnvironmentError` for an empty list, an unbalanced bracket or an empty group.
    public static func firstHost(_ list: String) throws -> String {
        var entry = ""
        var depth = 0
        for character in list.trimmingCharacters(in: .whitespaces) {
            if character == "," && depth == 0 { break }
            if character == "[" { depth += 1 }
            if character == "]" { depth -= 1 }
            guard depth == 0 || depth == 1 else { throw LaunchEnvironmentError("Slurm node list \"\(list)\": unbalanced brackets") }
            entry.append(character)
        }
        guard depth == 0, !entry.isEmpty else { throw LaunchEnvironmentError("Slurm node list \"\(list)\": no host in it or unbalanced brackets") }
        var host = ""
        var rest = Substring(entry)
        while let open = rest.firstIndex(of: "[") {
            host += rest[..<open]
            let close = rest[open...].firstIndex(of: "]")!
            let first = rest[rest.index(after: open)..<close].prefix { $0 != "," && $0 != "-" }
            guard !first.isEmpty, first.allSatisfy(\.isNumber) else {
                throw LaunchEnvironmentError("Slurm node list \"\(list)\": the group [\(rest[rest.index(after: open)..<close])] does not start with a number")
            }
            host += first
            rest = rest[rest.index(after: close)...]
        }
        return host + rest
    }
}
