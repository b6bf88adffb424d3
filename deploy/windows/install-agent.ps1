#Requires -RunAsAdministrator
<#
.SYNOPSIS
    Enroll this Windows host in a trainfleet fleet: a Scheduled Task that runs
    `trainfleet agent` at startup, as a chosen user, restarted on failure.

.DESCRIPTION
    Run from a checkout of this repository whose virtualenv has trainfleet installed
    (py -3.11 -m venv .venv; .venv\Scripts\pip install -e .[sklearn]). The script:
      1. checks what the agent detects on this host (trainfleet agent --detect) and stops
         if that fails, before registering anything;
      2. creates the work dir and gives the task's user full control of it;
      3. registers (or replaces) the Scheduled Task: trigger at startup, no time limit,
         restart every RestartMinutes on failure, the action
           python -m trainfleet.controller.cli agent --url URL [--creds FILE]
             --host-id ID --workdir DIR --stop-file DIR\agent.stop --log-file DIR\agent.log
         The settings travel as the agent's flags (each is the flag of the env var the
         Linux unit sets: --url NATS_URL, --creds NATS_CREDS, --host-id TRAINFLEET_HOST_ID,
         --workdir, --stop-file TRAINFLEET_STOP_FILE): a Scheduled Task has no environment
         of its own, and the task's definition is the one place they are kept.
      4. starts it (unless -NoStart).

    Stop it gently with deploy\windows\stop-agent.ps1 (the stop file: the agent drains,
    hands running jobs back and exits 0); remove it with uninstall-agent.ps1.
    Secrets never go on the command line: a NATS URL with a user or password in it is
    refused; give -CredsFile (or put the password in the creds file) instead.

.EXAMPLE
    .\deploy\windows\install-agent.ps1 -NatsUrl nats://fleet.lan:4222 `
        -CredsFile C:\ProgramData\trainfleet\agent.creds -RunAsUser trainfleet
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)] [string] $NatsUrl,
    [string] $CredsFile = '',
    [string] $HostId = $env:COMPUTERNAME.ToLowerInvariant(),
    [string] $WorkDir = (Join-Path $env:ProgramData 'trainfleet\agent'),
    # The account the agent (and so its trainers) runs as: a local or domain user, or SYSTEM.
    [string] $RunAsUser = 'SYSTEM',
    [securestring] $Password = $null,
    [string] $Python = (Join-Path (Split-Path -Parent (Split-Path -Parent $PSScriptRoot)) '.venv\Scripts\python.exe'),
    [string] $TaskName = 'trainfleet-agent',
    [string] $TrustKey = '',
    [string] $AgentArgs = '',
    [int] $RestartMinutes = 1,
    [int] $RestartCount = 9999,
    [switch] $NoStart
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

function Fail([string] $Message) {
    Write-Error "install-agent.ps1: $Message"
    exit 1
}

if (-not (Test-Path -LiteralPath $Python -PathType Leaf)) {
    Fail "no Python at $Python (create the venv first, or give -Python)"
}
if ($NatsUrl -match '://[^/]*@') {
    Fail 'the NATS URL carries credentials: they would be readable in the task definition; use -CredsFile'
}
if ($CredsFile -and -not (Test-Path -LiteralPath $CredsFile -PathType Leaf)) {
    Fail "no credentials file at $CredsFile"
}
if ($HostId -notmatch '^[a-z0-9]([a-z0-9_.-]*[a-z0-9])?$') {
    Fail "host id '$HostId' is not a valid id (letters, digits, '.', '_', '-')"
}

# 1. What the agent sees here; nothing is registered if it cannot even detect.
Write-Host "--- detecting this host's capability"
& $Python -m trainfleet.controller.cli agent --host-id $HostId --detect
if ($LASTEXITCODE -ne 0) { Fail "trainfleet agent --detect failed (exit $LASTEXITCODE)" }

# 2. The work dir: the agent's, and only its user's and administrators' (trainer outputs, health, log).
New-Item -ItemType Directory -Force -Path $WorkDir | Out-Null
$account = if ($RunAsUser -eq 'SYSTEM') { 'NT AUTHORITY\SYSTEM' } else { $RunAsUser }
& icacls.exe $WorkDir /inheritance:r /grant:r "${account}:(OI)(CI)F" '*S-1-5-32-544:(OI)(CI)F' '*S-1-5-18:(OI)(CI)F' | Out-Null
if ($LASTEXITCODE -ne 0) { Fail "icacls on $WorkDir failed (exit $LASTEXITCODE)" }
if ($CredsFile) {
    & icacls.exe $CredsFile /grant "${account}:R" | Out-Null
}

# 3. The task.
$stopFile = Join-Path $WorkDir 'agent.stop'
$logFile = Join-Path $WorkDir 'agent.log'
function Quote([string] $Word) { if ($Word -match '[\s"]') { '"' + ($Word -replace '"', '\"') + '"' } else { $Word } }
$arguments = @('-m', 'trainfleet.controller.cli', 'agent', '--url', $NatsUrl)
if ($CredsFile) { $arguments += @('--creds', $CredsFile) }
$arguments += @('--host-id', $HostId, '--workdir', $WorkDir, '--stop-file', $stopFile, '--log-file', $logFile)
if ($TrustKey) { $arguments += @('--trust-key', $TrustKey) }
$argumentLine = (($arguments | ForEach-Object { Quote $_ }) -join ' ')
if ($AgentArgs) { $argumentLine += " $AgentArgs" }

$action = New-ScheduledTaskAction -Execute $Python -Argument $argumentLine -WorkingDirectory $WorkDir
$trigger = New-ScheduledTaskTrigger -AtStartup
$settings = New-ScheduledTaskSettingsSet `
    -RestartCount $RestartCount `
    -RestartInterval (New-TimeSpan -Minutes $RestartMinutes) `
    -ExecutionTimeLimit ([TimeSpan]::Zero) `
    -MultipleInstances IgnoreNew `
    -StartWhenAvailable `
    -AllowStartIfOnBatteries `
    -DontStopIfGoingOnBatteries
if ($RunAsUser -eq 'SYSTEM') {
    $principal = New-ScheduledTaskPrincipal -UserId 'NT AUTHORITY\SYSTEM' -LogonType ServiceAccount -RunLevel Limited
} else {
    # Password logon: the task runs whether the user is logged on or not, with network access.
    $principal = New-ScheduledTaskPrincipal -UserId $RunAsUser -LogonType Password -RunLevel Limited
    if ($null -eq $Password) { $Password = Read-Host -AsSecureString "Password for $RunAsUser" }
}
$task = New-ScheduledTask -Action $action -Trigger $trigger -Settings $settings -Principal $principal `
    -Description "trainfleet agent ($HostId): pulls training jobs from $NatsUrl. Stop gently with stop-agent.ps1."

if (Get-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue) {
    Write-Host "--- replacing the existing task $TaskName (stopping its agent first)"
    & (Join-Path $PSScriptRoot 'stop-agent.ps1') -TaskName $TaskName -WorkDir $WorkDir
    Unregister-ScheduledTask -TaskName $TaskName -Confirm:$false
}
if ($RunAsUser -eq 'SYSTEM') {
    Register-ScheduledTask -TaskName $TaskName -InputObject $task | Out-Null
} else {
    $plain = [Runtime.InteropServices.Marshal]::PtrToStringUni(
        [Runtime.InteropServices.Marshal]::SecureStringToGlobalAllocUnicode($Password))
    try {
        Register-ScheduledTask -TaskName $TaskName -InputObject $task -User $RunAsUser -Password $plain | Out-Null
    } finally {
        $plain = $null
    }
}
Write-Host "--- registered scheduled task ${TaskName}: $Python $argumentLine"

# 4. Start it now (it also starts at every boot).
if (-not $NoStart) {
    Start-ScheduledTask -TaskName $TaskName
    Write-Host "--- started; log: $logFile; health: $Python -m trainfleet.controller.cli agent --health --workdir $WorkDir"
}
